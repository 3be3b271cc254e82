"""Train a federated model: ``python train.py fit --config configs/quickstart.yaml``.

See ``python train.py fit --help`` for every option; any config value can be overridden on the
command line, e.g. ``--model.lr 0.05 --data.num_clients 20 --trainer.max_steps 500``.
"""

from fl_lightning.cli import main

if __name__ == "__main__":
    main()
