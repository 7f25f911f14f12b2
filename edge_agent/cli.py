"""``splitkd-edge``: split training against a splitkd cloud, and ONNX inference.

``serve``, ``predict``, ``generate`` and ``pull`` need only the base install (onnxruntime,
no torch); ``train`` needs the ``[train]`` extra. Each command's options are one
settings class in :mod:`edge_agent.settings` (flags, SPLITKD_* variables and a
config file; see :mod:`splitkd.settings`); this module only runs the commands.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from edge_agent import security
from edge_agent.settings import (
    AdaptSettings,
    GenerateSettings,
    PlanSettings,
    PredictSettings,
    PullSettings,
    RollbackSettings,
    ServeSettings,
    TrainSettings,
)
from splitkd.errors import SplitKDError
from splitkd.settings import Command, Program

log = logging.getLogger("splitkd-edge")


def _global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log detail (-vv for debug)"
    )


def _need_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise SplitKDError(
            "training needs the [train] extra: pip install 'splitkd[train]'"
        ) from None
    return torch


def _train(args: TrainSettings) -> int:
    torch = _need_torch()
    from edge_agent.metrics import EdgeMetrics
    from edge_agent.run import train
    from splitkd import energy

    if args.eval_every < 1:
        raise SplitKDError(f"--eval-every must be 1 or more, got {args.eval_every}")
    # Check the profiles before any work: a typo should not cost a training run.
    energy.device_profile(args.device_profile)
    energy.link_profile(args.link_profile)
    torch.set_num_threads(1)  # small heads: threads cost more than they give
    metrics = None
    if args.metrics_port:
        from splitkd.energy_counter import EnergyCounter

        metrics = EdgeMetrics(inference=False, measured_energy=EnergyCounter().available)
        metrics.serve(args.metrics_port, args.metrics_host)
    report = train(_train_options(args, metrics))
    print(_summary(args, report))
    if metrics is not None and args.metrics_linger > 0:
        import time

        time.sleep(args.metrics_linger)
    return 0


def _plan(args: PlanSettings) -> int:
    torch = _need_torch()
    from edge_agent.plan import plan_command

    torch.set_num_threads(1)  # as train runs: the plan times what training will do
    print(plan_command(_train_options(args, None), args.objective, as_json=args.json_output))
    return 0


def _train_options(args: TrainSettings | PlanSettings, metrics: Any) -> Any:
    """run.TrainOptions: every field named like a setting is copied, the others derived here."""
    import dataclasses

    from edge_agent.model_store import default_checkpoint_dir
    from edge_agent.run import TrainOptions
    from splitkd.data.partition import parse_shard

    derived = {
        "shard": parse_shard(args.shard) if args.shard else None,
        "metrics": metrics,
        "security": security.EdgeSecurity.from_options(args),
    }
    if isinstance(args, TrainSettings):
        derived |= {
            "progress": not args.no_progress,
            "plots": not args.no_plots,
            "checkpoint_dir": args.checkpoint_dir or default_checkpoint_dir(args.device_id),
        }
    else:  # plan: no run, nothing written
        derived |= {"report": Path("."), "model_dir": Path("."), "retry_seconds": 0.0}
    same = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainOptions)
        if f.name in type(args).model_fields and f.name not in derived
    }
    return TrainOptions(**same, **derived)


def _summary(args: TrainSettings, report: dict[str, Any]) -> str:
    student, traffic, energy = report["student"], report["traffic"], report["energy"]
    data = report["data"]
    recall = student.get("macro_recall")
    macro = f", macro recall {recall:.4f}" if recall is not None else ""
    line = (
        f"{args.device_id}: student {student['name']} v{student['version']} accuracy {student['accuracy']:.4f}"
        f"{macro} (onnxruntime, {data['heldout_samples']} held-out samples), {report['steps']} steps, "
        f"{traffic['bytes_up'] / 1e6:.2f} MB up / {traffic['bytes_down'] / 1e6:.2f} MB down, "
        f"{report['wall_seconds']:.1f} s, est. {energy['estimate_joules']['total']:.1f} J "
        f"({energy['device_profile']}, {energy['link_profile']}); report: {args.report}"
    )
    if "set_aside_samples" in data:
        line += (
            f"\n{args.device_id}: data {data['spec']}: {data['train_samples']} training, "
            f"{data['heldout_samples']} held-out samples, {data['set_aside_samples']} set aside for "
            f"the cloud, {data['other_shard_samples']} in other shards; classes seen "
            f"{data['classes_seen']} of {data['signature']}"
        )
    return line


def _serve(args: ServeSettings) -> int:
    import uvicorn

    from edge_agent.http_api import create_app
    from edge_agent.metrics import EdgeMetrics
    from edge_agent.model_store import ModelStore

    metrics = EdgeMetrics(training=False)
    metrics.describe_device(args.device_id, args.device_profile, args.link_profile)
    token = security.http_token(args)
    if args.max_body_bytes < 0:
        raise SplitKDError("--max-body-bytes must be 0 (sized from the model) or more")
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "/v1/predict answers anyone who reaches %s:%d: set SPLITKD_HTTP_TOKEN_FILE to "
            "require a token (docs/SECURITY.md)",
            args.host,
            args.http_port,
        )
    from edge_agent.feedback import FeedbackStore

    feedback = FeedbackStore(
        args.feedback_db or args.model_dir / FEEDBACK_FILE, args.feedback_max_records
    )
    app = create_app(
        ModelStore(args.model_dir),
        metrics,
        token=token,
        max_body_bytes=args.max_body_bytes,
        feedback=feedback,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.http_port,
        log_level="warning",
        access_log=False,
        **security.https_options(args),
    )
    return 0


def _load_inputs(args: PredictSettings) -> Any:
    import numpy as np

    if args.json_array is not None:
        try:
            return np.asarray(json.loads(args.json_array), dtype=np.float32)
        except (ValueError, TypeError) as exc:
            raise SplitKDError(f"--json is not a numeric JSON array: {exc}") from None
    path = args.input
    assert path is not None  # PredictSettings requires --input or --json
    if not path.is_file():
        raise SplitKDError(f"input file {path} does not exist")
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False).astype(np.float32)
        return np.asarray(json.loads(path.read_text()), dtype=np.float32)
    except (ValueError, TypeError, OSError) as exc:
        raise SplitKDError(f"{path}: cannot read numeric inputs ({exc})") from None


def _predict(args: PredictSettings) -> int:
    from edge_agent.inference import Predictor
    from edge_agent.model_store import ModelStore

    model = ModelStore(args.model_dir).current()
    predictor = Predictor(model.path, tuple(model.metadata["input_shape"]))
    result = predictor.predict(_load_inputs(args))
    out = {
        "model": {"name": model.name, "version": model.version},
        "predictions": [
            {"class": int(c), "probabilities": [round(float(p), 6) for p in probs]}
            for c, probs in zip(result.classes, result.probabilities, strict=True)
        ],
    }
    print(json.dumps(out))
    return 0


def _generate(args: GenerateSettings) -> int:
    """Stream the continuation to stdout as it is decoded; speed to stderr."""
    from edge_agent.generate import Generator
    from edge_agent.model_store import ModelStore

    path = args.onnx_model or ModelStore(args.model_dir).current().path
    if not path.is_file():
        raise SplitKDError(f"model file {path} does not exist")
    generator = Generator(path)
    generator.check(args.prompt, args.max_tokens)  # before any output
    for piece in generator.text(args.prompt, args.max_tokens, args.temperature, args.seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    stats = generator.stats
    sys.stdout.write("\n")
    print(
        f"{stats.tokens} tokens, {stats.tokens_per_second:.0f} tokens/s, first token after "
        f"{stats.first_token_seconds * 1000:.1f} ms",
        file=sys.stderr,
    )
    return 0


def _pull(args: PullSettings) -> int:
    from edge_agent.model_store import ModelStore
    from edge_agent.pull import pull

    edge_security = security.EdgeSecurity.from_options(args)
    model = pull(
        args.cloud_http,
        args.model,
        args.version,
        ModelStore(args.model_dir),
        headers=dict(edge_security.call_metadata(args.device_id)),
        context=edge_security.tls.ssl_context() if edge_security.tls is not None else None,
    )
    print(
        f"installed {model.name} v{model.version} ({model.metadata['size_bytes']} bytes, "
        f"SHA-256 {model.metadata['sha256'][:12]}…) in {model.path.parent}"
    )
    return 0


FEEDBACK_FILE = "feedback.sqlite3"


def _adapt(args: AdaptSettings) -> int:
    try:
        import torch
    except ImportError:
        raise SplitKDError("adapt needs the [train] extra: pip install 'splitkd[train]'") from None
    from edge_agent.adapt import AdaptOptions, adapt
    from splitkd.atomic import write_json_atomic

    torch.set_num_threads(1)
    report = adapt(
        AdaptOptions(
            cloud=args.cloud,
            model_dir=args.model_dir,
            device_id=args.device_id,
            report=args.report,
            data=args.data,
            cohort=args.cohort,
            feedback_db=(args.feedback_db or args.model_dir / FEEDBACK_FILE)
            if args.feedback
            else None,
            timeout=args.timeout,
            security=security.EdgeSecurity.from_options(args),
        )
    )
    args.report.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.report, report)
    verdict = "accepted" if report["accepted"] else f"refused ({report['reason']})"
    student = report["student"]
    print(
        f"{args.device_id}: teacher update {verdict}; held-out accuracy "
        f"{report['before']['accuracy']:.4f} -> {report['after']['accuracy']:.4f}, serving "
        f"{student['name']} v{student['version']}; {report['traffic']['bytes_up']} bytes up "
        f"(raw data: {report['traffic']['raw_data_bytes']}); report: {args.report}"
    )
    return 0


def _rollback(args: RollbackSettings) -> int:
    from edge_agent.model_store import ModelStore

    model = ModelStore(args.model_dir).rollback()
    print(f"serving {model.name} v{model.version} again")
    return 0


PROGRAM = Program(
    prog="splitkd-edge",
    description="The splitkd edge agent: trains a small student with a cloud teacher by split "
    "knowledge distillation (raw data never leaves this device), then serves it with onnxruntime.",
    global_options=_global_options,
    commands=(
        Command(
            "train",
            TrainSettings,
            _train,
            help="split-train a student, then download and verify it",
            description="Split-train with the cloud: this device runs the student's head and the "
            "teacher's frozen head on its data and sends only activations; the cloud sends back "
            "gradients. At the end the ONNX student is downloaded, verified and evaluated here.",
        ),
        Command(
            "plan",
            PlanSettings,
            _plan,
            help="measure this device and the link, predict each way to train, choose one",
            description="Time the student's and teacher's heads at every cut the cloud allows, "
            "probe the link's round trip and throughput, and predict for each candidate (split at "
            "each cut with each wire codec, or federated) the seconds, device joules and bytes of "
            "an epoch and of the whole run; print a table and the best for --objective.",
        ),
        Command("serve", ServeSettings, _serve, help="HTTP inference API over the current student"),
        Command(
            "predict",
            PredictSettings,
            _predict,
            help="classify once from the command line",
            description="Classify samples from a .npy or .json file (one sample or a batch) "
            "or from --json, with the current student.",
        ),
        Command(
            "generate",
            GenerateSettings,
            _generate,
            help="continue a text with the current language-model student (no torch needed)",
            description="Stream the student's continuation of --prompt, byte by byte, with "
            "onnxruntime and the key/value cache of the exported decoder.",
        ),
        Command("pull", PullSettings, _pull, help="download a student over HTTP (no torch needed)"),
        Command(
            "adapt",
            AdaptSettings,
            _adapt,
            help="adapt the installed student on this device's data, report only the knowledge "
            "difference to the cloud, switch to the re-distilled student if it is better here",
        ),
        Command("rollback", RollbackSettings, _rollback, help="serve the previous model again"),
    ),
)


def main(argv: list[str] | None = None) -> int:
    from splitkd.logs import configure

    try:
        args, command, options = PROGRAM.parse(argv)
        configure(args.verbose)
        return command.handler(options)
    except SplitKDError as exc:
        print(f"splitkd-edge: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"splitkd-edge: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
