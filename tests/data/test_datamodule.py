"""FederatedDataModule: stacked, device-side, stateless-per-step sampling (DESIGN §2.3)."""

from __future__ import annotations

import pytest
import torch

from fl_lightning import FederatedDataModule


def _clients(sizes: list[int], d: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # sample j of client i holds the value 1000·i + j, so every draw can be traced back to its client
    return [(torch.arange(m, dtype=torch.float32).add(1000 * i).unsqueeze(1).repeat(1, d), torch.full((m,), i))
            for i, m in enumerate(sizes)]


def test_minibatches_are_stacked_and_drawn_from_each_clients_own_data() -> None:
    dm = FederatedDataModule.from_client_tensors(_clients([5, 9, 13]), batch_size=4, seed=0)
    dm.setup()
    batch = dm.sample(0, None, torch.device("cpu"))
    assert batch.inputs.shape == (3, 4, 3) and batch.targets.shape == (3, 4) and batch.mask is None
    owner = (batch.inputs[..., 0] // 1000).long()
    assert torch.equal(owner, torch.arange(3).unsqueeze(1).expand(3, 4))
    assert torch.equal(batch.targets, owner)
    within = batch.inputs[..., 0] % 1000
    assert (within < torch.tensor([5, 9, 13]).unsqueeze(1)).all()


def test_a_step_draws_the_same_batch_whatever_subset_of_clients_asks() -> None:
    dm = FederatedDataModule.from_client_tensors(_clients([20, 20, 20, 20]), batch_size=6, seed=3)
    dm.setup()
    cpu = torch.device("cpu")
    full = dm.sample(7, None, cpu)
    part = dm.sample(7, torch.tensor([1, 3]), cpu)
    assert torch.equal(part.inputs, full.inputs[[1, 3]])
    assert not torch.equal(dm.sample(8, None, cpu).inputs, full.inputs)  # another step, another draw
    assert torch.equal(dm.sample(7, None, cpu).inputs, full.inputs)  # stateless: same step, same draw


def test_augmented_batches_do_not_depend_on_which_other_clients_are_sampled() -> None:
    # cohorts and clients sharded over ranks ask for subsets: client i's crops and flips must not change
    g = torch.Generator().manual_seed(0)
    clients = [(torch.rand(10, 3, 8, 8, generator=g) + 0.5, torch.zeros(10, dtype=torch.long)) for _ in range(4)]
    for batch_size in (5, None):
        dm = FederatedDataModule.from_client_tensors(clients, batch_size=batch_size, seed=2, augment="crop_flip")
        dm.setup()
        cpu = torch.device("cpu")
        full = dm.sample(3, None, cpu).inputs
        assert torch.equal(dm.sample(3, torch.tensor([1, 3]), cpu).inputs, full[[1, 3]])
        assert torch.equal(dm.sample(3, torch.tensor([2]), cpu).inputs, full[[2]])
        plain = FederatedDataModule.from_client_tensors(clients, batch_size=batch_size, seed=2)
        plain.setup()
        assert not torch.equal(full, plain.sample(3, None, cpu).inputs), "the batch was augmented"


def test_sampling_covers_a_client_uniformly() -> None:
    dm = FederatedDataModule.from_client_tensors(_clients([4]), batch_size=4, seed=0)
    dm.setup()
    draws = torch.cat([dm.sample(t, None, torch.device("cpu")).inputs[0, :, 0] for t in range(250)])
    counts = torch.bincount(draws.long(), minlength=4)
    # 1000 draws over 4 samples: each count ~ Binomial(1000, 1/4), sd ≈ 13.7; 250 ± 70 is a 5-sd band
    assert ((counts - 250).abs() < 70).all(), counts


def test_a_batch_larger_than_every_client_fails_at_setup_and_one_larger_than_some_warns() -> None:
    with pytest.raises(ValueError, match=r"batch_size=9 exceeds every client's data \(the largest client holds 4"):
        FederatedDataModule.from_client_tensors(_clients([2, 4]), batch_size=9, seed=0).setup()
    with pytest.warns(UserWarning, match=r"batch_size=3 exceeds the data of 1 of 2 clients \(smallest: 2"):
        FederatedDataModule.from_client_tensors(_clients([2, 4]), batch_size=3, seed=0).setup()


def test_full_batch_pads_unequal_clients_and_marks_the_padding() -> None:
    dm = FederatedDataModule.from_client_tensors(_clients([2, 4]), batch_size=None)
    dm.setup()
    assert dm.padded
    batch = dm.sample(0, None, torch.device("cpu"))
    assert batch.inputs.shape == (2, 4, 3)
    assert batch.mask.tolist() == [[True, True, False, False], [True, True, True, True]]
    x, y = batch.client(0)
    assert x[:, 0].tolist() == [0.0, 1.0] and y.tolist() == [0, 0]
    equal = FederatedDataModule.from_client_tensors(_clients([3, 3]), batch_size=None)
    equal.setup()
    assert not equal.padded and equal.sample(0, None, torch.device("cpu")).mask is None


def test_client_weights_are_uniform_or_proportional_to_sizes() -> None:
    uniform = FederatedDataModule.from_client_tensors(_clients([1, 3]), batch_size=1)
    sized = FederatedDataModule.from_client_tensors(_clients([1, 3]), batch_size=1, client_weighting="num_samples")
    assert uniform.client_weights.tolist() == [0.5, 0.5]
    assert sized.client_weights.tolist() == [0.25, 0.75]
    assert uniform.num_classes == 2


def test_the_embedded_digits_split_has_a_held_out_test_set() -> None:
    dm = FederatedDataModule(dataset="digits", num_clients=10, partition="iid", batch_size=16, seed=0)
    dm.setup()
    assert dm.num_classes == 10 and sum(dm.client_sizes) == 1437
    x_test, y_test = next(dm.eval_batches(torch.device("cpu")))
    assert x_test.shape[1] == 64 and len(y_test) == 360


def test_prepare_data_reads_the_dataset_once_for_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning calls prepare_data, then setup, in the same process: the files are parsed once (FEMNIST's
    JSON takes minutes)."""
    import fl_lightning.data.datamodule as datamodule

    calls: list[str] = []
    real = datamodule.load_dataset

    def counting(name: str, *args: object, **kwargs: object) -> object:
        calls.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(datamodule, "load_dataset", counting)
    dm = FederatedDataModule(dataset="digits", num_clients=5, partition="iid", batch_size=4, seed=0)
    dm.prepare_data()
    dm.setup("fit")
    assert calls == ["digits"] and sum(dm.client_sizes) == 1437


def test_state_dict_restores_the_partition_and_the_seed() -> None:
    dm = FederatedDataModule(dataset="digits", num_clients=5, partition="iid", seed=1)
    dm.setup()
    other = FederatedDataModule(dataset="digits", num_clients=5, partition="iid", seed=2)
    other.setup()
    assert not all(len(a) == len(b) and (a == b).all() for a, b in zip(dm.client_indices, other.client_indices))
    other.load_state_dict(dm.state_dict())
    assert other.seed == 1
    assert all((a == b).all() for a, b in zip(dm.client_indices, other.client_indices))
    cpu = torch.device("cpu")
    assert torch.equal(other.sample(4, None, cpu).inputs, dm.sample(4, None, cpu).inputs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_clients": 0}, "num_clients"),
        ({"batch_size": 0}, "batch_size"),
        ({"client_weighting": "by_size"}, "client_weighting"),
        ({"steps_per_epoch": 0}, "steps_per_epoch"),
        ({"augment": "mixup"}, "augmentation"),
    ],
)
def test_invalid_datamodule_arguments_name_the_parameter(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FederatedDataModule(**kwargs)


def test_a_client_without_samples_is_rejected() -> None:
    with pytest.raises(ValueError, match="client 1 has no samples"):
        FederatedDataModule.from_client_tensors([(torch.ones(2, 1), torch.ones(2)), (torch.ones(0, 1), torch.ones(0))])
