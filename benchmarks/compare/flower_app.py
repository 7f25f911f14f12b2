"""Flower FedAvg as a practitioner writes it: a server and a NumPyClient, one process each.

Runs in the Flower virtual environment (``.venv-flower``: flwr 1.42, torch, numpy),
never in splitkd's: ``python -m benchmarks.compare.flower_app server|client ...``.
It talks Flower's legacy gRPC transport (``flwr.server.start_server`` /
``flwr.client.start_client``, bidirectional gRPC stream), which 1.42 still ships.

The student, its initial weights, the batch order and the optimizer come from
splitkd (``splitkd.models.zoo``, ``splitkd.training``: torch and numpy only), so
the two systems train the same network from the same start with the same
steps; only what crosses the network differs. Training is plain cross-entropy
on the device's shard: FedAvg has no teacher.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

# Flower reports usage events to its servers unless told not to; this benchmark
# runs on loopback only. Set before flwr is imported (it reads it at import).
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"

import flwr
import numpy as np
import torch
import torch.nn.functional as F

from splitkd.hyper import Hyperparameters
from splitkd.models import zoo
from splitkd.models.spec import ModelSpec
from splitkd.models.staged import StagedModel
from splitkd.training import accuracy_of, batch_order, make_optimizer, predict


def _weights(model: StagedModel) -> list[np.ndarray]:
    return [value.detach().numpy().copy() for value in model.state_dict().values()]


def _load(model: StagedModel, weights: list[np.ndarray]) -> None:
    keys = list(model.state_dict())
    model.load_state_dict(
        {k: torch.from_numpy(np.asarray(w)) for k, w in zip(keys, weights, strict=True)}
    )


class DigitsClient(flwr.client.NumPyClient):
    """One device: its shard, the shared student, E local epochs per round."""

    def __init__(
        self, spec: ModelSpec, hyper: Hyperparameters, shard: Path, out: Path, epochs: int
    ):
        with np.load(shard, allow_pickle=False) as arrays:
            self.train_x, self.train_y = arrays["train_x"], arrays["train_y"]
            self.heldout_x, self.heldout_y = arrays["heldout_x"], arrays["heldout_y"]
        self.model = zoo.build(spec, hyper.seed)
        self.hyper, self.out, self.local_epochs = hyper, out, epochs
        self.train_seconds = 0.0
        self.rounds = 0

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return _weights(self.model)

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        started = time.perf_counter()
        _load(self.model, parameters)
        # A fresh optimizer each round, as in Flower's examples: Adam's moments stay local.
        optimizer = make_optimizer(self.model.parameters(), self.hyper)
        x, y = torch.from_numpy(self.train_x), torch.from_numpy(self.train_y)
        first_epoch = (int(config["server_round"]) - 1) * self.local_epochs
        self.model.train()
        for epoch in range(first_epoch, first_epoch + self.local_epochs):
            for index in batch_order(len(y), self.hyper.batch_size, self.hyper.seed, epoch):
                ix = torch.from_numpy(index)
                loss = F.cross_entropy(self.model(x[ix]), y[ix])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        self.train_seconds += time.perf_counter() - started
        self.rounds += 1
        return _weights(self.model), len(y), {}

    def evaluate(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, int, dict[str, Any]]:
        _load(self.model, parameters)
        logits = predict(self.model, self.heldout_x)
        loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(self.heldout_y)))
        accuracy = accuracy_of(logits, self.heldout_y)
        if config.get("final"):
            names = list(self.model.state_dict())
            arrays: dict[str, Any] = dict(zip(names, _weights(self.model), strict=True))
            np.savez(self.out.with_suffix(".npz"), **arrays)
            report = {
                "accuracy": accuracy,
                "rounds": self.rounds,
                "train_seconds": self.train_seconds,
            }
            self.out.with_suffix(".json").write_text(json.dumps(report))
        return loss, len(self.heldout_y), {"accuracy": accuracy}


class FinalEvaluationFedAvg(flwr.server.strategy.FedAvg):
    """FedAvg that sends the model for evaluation after the last round only:
    each device still ends with the final model, without one extra download per round."""

    def __init__(self, rounds: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rounds = rounds

    def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        if server_round < self.rounds:
            return []
        return super().configure_evaluate(server_round, parameters, client_manager)


def serve(args: argparse.Namespace) -> None:
    spec = ModelSpec.from_json(args.family, args.spec)
    initial = flwr.common.ndarrays_to_parameters(_weights(zoo.build(spec, args.seed)))
    options: dict[str, Any] = {
        "fraction_fit": 1.0,
        "fraction_evaluate": 1.0,
        "min_fit_clients": args.clients,
        "min_evaluate_clients": args.clients,
        "min_available_clients": args.clients,
        "initial_parameters": initial,
        "on_fit_config_fn": lambda r: {"server_round": r},
        "on_evaluate_config_fn": lambda r: {"server_round": r, "final": r == args.rounds},
    }
    if args.evaluate == "final":
        strategy = FinalEvaluationFedAvg(args.rounds, **options)
    else:
        strategy = flwr.server.strategy.FedAvg(**options)
    flwr.server.start_server(
        server_address=f"127.0.0.1:{args.port}",
        config=flwr.server.ServerConfig(num_rounds=args.rounds),
        strategy=strategy,
    )


def client(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # as splitkd's edge: a small model on a small device
    spec = ModelSpec.from_json(args.family, args.spec)
    hyper = Hyperparameters(**json.loads(args.hyper))
    device = DigitsClient(spec, hyper, args.shard, args.out, args.local_epochs)
    # The server is up before any client starts; a client that cannot reach it gives up.
    flwr.client.start_client(
        server_address=args.server, client=device.to_client(), insecure=True, max_wait_time=120
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare.flower_app")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("server", "client"):
        part = sub.add_parser(name)
        part.add_argument("--family", required=True, help="student model family")
        part.add_argument("--spec", required=True, help="student spec JSON (ModelSpec.to_json)")
    server = sub.choices["server"]
    server.add_argument("--port", type=int, required=True)
    server.add_argument("--clients", type=int, required=True)
    server.add_argument("--rounds", type=int, required=True)
    server.add_argument("--seed", type=int, required=True, help="initial weights of the student")
    server.add_argument("--evaluate", choices=["final", "every-round"], default="final")
    device = sub.choices["client"]
    device.add_argument("--server", required=True, help="HOST:PORT (the relay)")
    device.add_argument("--shard", type=Path, required=True, help=".npz of train_/heldout_ x, y")
    device.add_argument("--hyper", required=True, help="splitkd Hyperparameters as JSON")
    device.add_argument("--local-epochs", type=int, required=True)
    device.add_argument("--out", type=Path, required=True, help="final model .npz and report .json")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    serve(args) if args.command == "server" else client(args)


if __name__ == "__main__":
    main()
