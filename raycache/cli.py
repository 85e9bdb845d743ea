"""`raycache run | check | synth | sweep | compare | methods | predict | ui`. A user's mistake exits 2 with one line."""

from __future__ import annotations

import argparse
import os
import sys
import time

from raycache.errors import find_run_failure, find_user_error


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raycache", description="Federated fine-tuning of CLIP on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one federated experiment")
    run.add_argument("config", help="experiment YAML file")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a dotted config key, e.g. --set data.alpha=0.1 (repeatable)")
    run.add_argument("--resume", metavar="RUN_ID", default=None,
                     help="continue this MLflow run (its driver died) from its last checkpointed round")
    run.add_argument("--register", metavar="NAME", default=None,
                     help="register the run's model in MLflow's model registry (same as tracking.register)")
    check = sub.add_parser("check", help="validate an experiment config (and overrides) without running it")
    check.add_argument("config", help="experiment YAML file")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a dotted config key (repeatable)")
    synth = sub.add_parser("synth", help="generate a class-balanced synthetic image set (synth.*)")
    synth.add_argument("config", help="experiment YAML file (its synth section and dataset classes)")
    synth.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a dotted config key, e.g. --set synth.per_class=4 (repeatable)")
    sweep = sub.add_parser("sweep", help="a Ray Tune sweep: one experiment per trial, nested MLflow runs")
    sweep.add_argument("config", help="sweep YAML file (name, base experiment, space)")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a key of the base experiment, e.g. --set federation.rounds=1 (repeatable)")
    sweep.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    sweep.add_argument("--name", default=None, help="sweep name (default: the file's `name`)")
    sweep.add_argument("--address", default=None, help="Ray address to join (e.g. auto); default: local Ray")
    cmp = sub.add_parser("compare", help="compare the methods of one MLflow experiment (table + plots)")
    cmp.add_argument("experiment", help="MLflow experiment name (tracking.experiment)")
    methods = sub.add_parser("methods", help="list the registered methods, or one method's settings")
    methods.add_argument("name", nargs="?", default=None, help="a method: its settings, defaults and help")
    pred = sub.add_parser("predict", help="classify image files or folders with a finished run's model")
    pred.add_argument("run_id", metavar="RUN_ID", help="the MLflow run whose model classifies")
    pred.add_argument("paths", nargs="+", metavar="PATH", help="image files, or folders (searched recursively)")
    pred.add_argument("--out", default=None, metavar="CSV", help="write path,class,score rows here instead")
    pred.add_argument("--client", type=int, default=None, metavar="N",
                      help="a personal method's run: predict with client N's own state")
    ui = sub.add_parser("ui", help="open the MLflow UI on 127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    return p


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def rate_eta(done: int, total: int, seconds: float) -> str:
    """'512/1797  43.1/s  ETA 0:30' for work `done` of `total` after `seconds`."""
    rate = done / seconds if seconds > 0 else 0.0
    left = (total - done) / rate if rate > 0 else None
    eta = "--:--" if left is None else f"{int(left) // 60}:{int(left) % 60:02d}"
    return f"{done}/{total}  {rate:.1f}/s  ETA {eta}"


def quiet_libraries() -> None:
    """The terminal shows our progress and our one-line errors. Library chatter (MLflow's schema set-up,
    Ray Data's own copy of an exception we re-raise) stays in their log files."""
    import logging

    import ray.data  # noqa: F401  (configures its loggers on import; override after)

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)


def cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from raycache.config_file import load_config
    from raycache.experiment import run_experiment

    cfg = load_config(args.config, args.overrides + ([f"tracking.register={args.register}"] if args.register
                                                     else []))
    quiet_libraries()
    console = Console(stderr=True)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[status]}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("setting up", total=cfg.federation.rounds, status="")

        def on_stage(text: str) -> None:
            progress.update(task, description=text)

        work: dict[str, tuple[int, float]] = {}  # what -> (its progress task, when it started)

        def on_progress(what: str, done: int, total: int) -> None:
            """Encoding, generation: done / total, rate and ETA on a bar of its own (a terminal only)."""
            if not console.is_terminal:
                return
            if what not in work:
                work[what] = (progress.add_task(what, total=total, status=""), time.perf_counter())
            bar, t0 = work[what]
            progress.update(bar, completed=done, total=total, status=rate_eta(done, total, time.perf_counter() - t0))

        def on_round(r: int, m: dict[str, float]) -> None:
            val = f"val {m['val_accuracy']:.4f}  " if "val_accuracy" in m else ""
            status = f"{val}test {m['accuracy']:.4f}  loss {m['loss']:.4f}  {m['round_seconds']:.2f}s"
            progress.update(task, advance=1, description=f"round {r}/{cfg.federation.rounds}", status=status)
            if not console.is_terminal:  # a log file gets one plain line per round instead of a live bar
                console.print(f"round {r}/{cfg.federation.rounds}  {status}", highlight=False)

        summary = run_experiment(cfg, on_round=on_round, on_stage=on_stage, resume=args.resume,
                                 on_progress=on_progress)

    split = f"Dirichlet alpha={cfg.data.alpha}" if cfg.data.partition == "dirichlet" else cfg.data.partition
    table = Table(title=f"raycache: {summary.method} on {cfg.data.dataset}, {cfg.data.clients} clients ({split})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    from raycache.models.clip import PRESETS

    preset = PRESETS.get(cfg.model.name)
    chance = " (chance: untrained text tower)" if preset is not None and not preset.text_trained else ""
    table.add_row("zero-shot accuracy", f"{summary.zeroshot_accuracy:.4f}{chance}")
    from raycache.methods import method_class

    method = method_class(cfg.method.name)
    label = method.flow.result_label
    sel = summary.selection
    if "accuracy" in summary.initial:
        table.add_row("round 0, before training (test)", f"{summary.initial['accuracy']:.4f}")
    if "best_round" in sel and cfg.federation.selection == "best_val":
        table.add_row("selected round (best validation accuracy)", f"{sel['best_round']:.0f} "
                                                                   f"(val {sel['best_val_accuracy']:.4f})")
        table.add_row("test accuracy at the selected round", f"{sel['selected_accuracy']:.4f}")
    elif "best_round" in sel:
        table.add_row("best validation round (not the result: federation.selection=final)",
                      f"{sel['best_round']:.0f} (val {sel['best_val_accuracy']:.4f})")
    if "searched_alpha" in sel:
        table.add_row("alpha, beta searched on validation",
                      f"{sel['searched_alpha']:.3g}, {sel['searched_beta']:.3g} (test {sel['result_accuracy']:.4f})")
    table.add_row(label + " (test)", f"{summary.final['accuracy']:.4f}")
    table.add_row("client accuracy, re-weighted test (mean ± std)",
                  f"{summary.final['client_accuracy_mean']:.4f} ± {summary.final['client_accuracy_std']:.4f}")
    if "local_accuracy_mean" in summary.final:
        table.add_row("local accuracy, clients' own held-out samples (mean ± std)",
                      f"{summary.final['local_accuracy_mean']:.4f} ± {summary.final['local_accuracy_std']:.4f}")
    if "rounds_to_target" in sel:
        table.add_row(f"rounds / bytes to val accuracy {cfg.federation.target_accuracy:g}",
                      f"{sel['rounds_to_target']:.0f} / {_fmt_bytes(sel['bytes_to_target'])}")
    if method.uses_cache(cfg.method):
        init = cfg.method.cache_init
        cache = init + (f" ({cfg.synth.generator})" if init == "synthetic" else "")
        table.add_row("cache keys from", cache)
    table.add_row("trainable params", f"{summary.final.get('trainable_params', 0):,.0f}")
    table.add_row("rounds", str(summary.rounds))
    table.add_row("bytes sent (up + down)", f"{_fmt_bytes(summary.comm_bytes)} "
                                             f"({_fmt_bytes(summary.comm_bytes_up)} up)")
    table.add_row("images encoded this run", f"{summary.encoded} of {summary.distinct_images}")
    table.add_row("wall time (ray / encode / rounds)",
                  " / ".join(f"{summary.timings.get(k, 0):.1f}s"
                             for k in ("time_ray_start_s", "time_encode_s", "time_rounds_s")))
    Console().print(table)
    print(f"MLflow run {summary.run_id} in experiment '{cfg.tracking.experiment}'. To open it:\n  "
          f"{summary.ui_hint}")
    if summary.model_uri:
        registered = f" (registered as {cfg.tracking.register})" if cfg.tracking.register else ""
        print(f"Its model, {summary.model_uri}{registered}, classifies images:\n  "
              f"raycache predict {summary.run_id} PATH...")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from raycache.config import flatten

    from raycache.config_file import load_config
    from raycache.ray_session import check_fits, ensure_ray
    from raycache.synth.contact import contact_sheet
    from raycache.synth.generate import fill, prepare, resolve_classes
    from raycache.tracking import Run

    cfg = load_config(args.config, args.overrides)
    quiet_libraries()
    dataset_classes = None
    if cfg.synth.classes is None:
        from raycache.data.sources import open_source

        dataset_classes = open_source(cfg.data).class_names
    classes = resolve_classes(cfg.synth, dataset_classes)
    store = prepare(cfg.synth, classes, cfg.runtime.cache_dir)  # every input check, before any compute
    ensure_ray(cfg.runtime)
    if cfg.runtime.address is None:
        check_fits("synth.num", cfg.synth.actors, cfg.synth.num_cpus, cfg.synth.num_gpus)
    run = Run(cfg.tracking.experiment, cfg.tracking.run_name, tags={"raycache.kind": "synth"})
    try:
        run.log_params({**flatten({"synth": store.settings}), "synth.out": str(store.out),
                        "synth.actors": cfg.synth.actors, "synth.num_gpus": cfg.synth.num_gpus})
        total = len(classes) * cfg.synth.per_class
        console = Console(stderr=True)
        with Progress(TextColumn("[bold]generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True) as progress:
            task = progress.add_task("synth", total=total)
            result = fill(store, cfg.synth, on_images=lambda n: progress.advance(task, n))
        run.log_metrics({"images": result.images, "images_generated": result.generated,
                         "seconds": result.seconds, "images_per_s": result.images_per_s})
        run.log_image(contact_sheet(result.out, classes), "contact_sheet.png")
    except BaseException as err:
        run.finish(err)
        raise
    run.finish()
    print(f"synthetic set: {result.out}  ({len(classes)} classes x {cfg.synth.per_class} images; "
          f"{result.generated} generated now in {result.seconds:.1f}s, {result.images_per_s:.2f} images/s)")
    print(f"MLflow run {run.run_id}: {run.ui_hint()}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from raycache.compare import HEADER, compare

    quiet_libraries()
    rows, run = compare(args.experiment)
    table = Table(title=f"raycache compare: {args.experiment}")
    for i, h in enumerate(HEADER):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:  # exact numbers are in the logged comparison.csv; here, readable ones
        cells = row.cells()
        cells[9], cells[10] = _fmt_bytes(row.bytes_total), f"{row.trainable_params:,.0f}"
        cells[3] = "-" if row.lr != row.lr else cells[3]
        table.add_row(*cells)
    console = Console()
    Console(width=max(console.width, 180)).print(table)  # never truncate a method name in a pipe or log
    print(f"plots and table logged to MLflow run {run.run_id}: {run.ui_hint()}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from raycache.sweep.runner import run_sweep
    from raycache.sweep.space import load_sweep

    sweep, base = load_sweep(args.config, args.overrides, name=args.name)
    quiet_libraries()
    print(f"sweep {sweep.name}: {len(sweep.space)} keys, scheduler {sweep.scheduler}, up to {sweep.max_concurrent} "
          f"trials at once", file=sys.stderr)
    console = Console(stderr=True)
    with Progress(TextColumn("[bold]trials"), BarColumn(), TextColumn("{task.fields[status]}"),
                  TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("trials", total=None, status="")
        started = time.perf_counter()

        def on_trial(ended: int, total: int) -> None:  # done / total, rate, ETA (a terminal only)
            bar.update(task, completed=ended, total=total,
                       status=rate_eta(ended, total, time.perf_counter() - started))

        result = run_sweep(sweep, base, resume=args.resume, address=args.address, on_trial=on_trial)
    table = Table(title=f"raycache sweep: {sweep.name}")
    for h in ["trial", *sweep.space, sweep.metric, "test accuracy (reported)", "status"]:
        table.add_column(h)
    for t in result.trials:
        table.add_row(t["trial"], *(str(t["params"].get(k, "")) for k in sweep.space),
                      "" if t["metric"] is None else f"{t['metric']:.4f}",
                      "" if t.get("test_accuracy") is None else f"{t['test_accuracy']:.4f}", t["status"])
    console = Console()
    Console(width=max(console.width, 120)).print(table)
    if result.best is not None:
        test = result.best.get("test_accuracy")
        print(f"best: {result.best['trial']} {sweep.metric}={result.best['metric']:.4f} {result.best['params']}"
              + ("" if test is None else f" (test accuracy {test:.4f})"))
    failed = [t for t in result.trials if t["status"] == "FAILED"]
    for t in failed:
        print(f"failed: {t['trial']}: {t['failure_reason']}", file=sys.stderr)
    print(f"parent MLflow run {result.parent_run_id} (children nested under it). To open the sweep:\n  "
          f"{result.ui_hint}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from raycache.config_file import load_config

    cfg = load_config(args.config, args.overrides)
    print(f"config ok: {cfg.method.name} on {cfg.data.dataset}, {cfg.data.clients} clients, "
          f"{cfg.federation.rounds} rounds")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from rich.table import Table

    from raycache.errors import UserError
    from raycache.methods import BUILTIN, method_class, method_names
    from raycache.methods.settings import settings_help

    console = Console(width=max(Console().width, 140))
    if args.name is None:
        table = Table(title="raycache methods (raycache methods NAME: its settings)")
        for col in ("method", "flow", "averaged", "source", "what it is"):
            table.add_column(col)
        for name in method_names():
            cls = method_class(name)
            doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
            table.add_row(name, cls.flow.name, cls.weighting if cls.flow.aggregates else "-",
                          "built-in" if name in BUILTIN else "entry point", doc)
        console.print(table)
        return 0
    if args.name not in method_names():
        raise UserError(f"method: unknown method {args.name!r}; choose one of: {', '.join(method_names())}")
    table = Table(title=f"method.* settings of {args.name}")
    for col in ("key", "default", "help"):
        table.add_column(col)
    for key, (default, text) in settings_help(method_class(args.name).Settings).items():
        table.add_row(f"method.{key}", repr(default), text)
    console.print(table)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from raycache.predict import predict_files

    quiet_libraries()
    return predict_files(args.run_id, args.paths, args.out, args.client)


def cmd_ui(args: argparse.Namespace) -> int:
    from raycache.tracking import masked, tracking_uri

    # The store goes through the environment, not the command line, which every user of the machine can read
    # (ps); what is printed is masked.
    argv = [sys.executable, "-m", "mlflow", "ui", "--host", args.host, "--port", str(args.port)]
    print(f"mlflow ui on http://{args.host}:{args.port} for {masked(tracking_uri())}", file=sys.stderr)
    os.execvpe(argv[0], argv, {**os.environ, "MLFLOW_BACKEND_STORE_URI": tracking_uri()})
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        commands = {"run": cmd_run, "check": cmd_check, "synth": cmd_synth, "sweep": cmd_sweep, "compare": cmd_compare,
                    "methods": cmd_methods, "predict": cmd_predict, "ui": cmd_ui}
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a user's mistake is one line and exit 2; anything else is a bug: traceback
        user = find_user_error(err)
        if user is None:
            failed = find_run_failure(err)
            if failed is not None:  # not a bug and not bad input: the run is FAILED with this reason
                print(f"run failed: {failed}", file=sys.stderr)
                return 1
            raise
        print(f"error: {user}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
