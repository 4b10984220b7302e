"""The ``fedopt`` command.

``fedopt run CONFIG [--set key=value ...] [--out DIR] [--quiet]`` runs one config and writes a run
folder, with a checkpoint every ``checkpoint_every`` outer iterations (config key; default about a
tenth of the run); ``fedopt run --resume DIR`` continues a killed run from its checkpoint, to the
same numbers as an uninterrupted run. Exit codes: 0 finished; 2 bad input (config, values, files, arguments: one line
``fedopt: error: ...`` on stderr, nothing written); 3 the run diverged (NaN/inf; the folder records
the round); 130 interrupted by SIGINT, 143 by SIGTERM (the folder says ``interrupted`` and keeps its
checkpoint: ``--resume`` continues it).

``fedopt sweep SWEEP.toml [--executor serial|process|ray] [--address ADDR] [--workers N] [--out DIR]
[--quiet]`` runs a sweep (``fedopt.sweep``) into ``DIR`` (default ``sweeps/<sweep name>``; running
the same command again skips the finished runs). One sweep at a time holds ``DIR`` (a lock on
``DIR/.lock``, released by the OS when the process ends, however it ends); a second one is refused.
Exit codes: 0 every run finished or diverged; 1 some run failed (listed; rerun to retry them); 2 bad
input before any run; 130 interrupted by SIGINT, 143 by SIGTERM (workers are stopped; the same
command resumes).

``fedopt reproduce --list`` lists the paper figures; ``fedopt reproduce ID [--quick] [--out DIR]
[--executor E]`` reruns one (``fedopt.figures``) into ``DIR`` (default ``figures/ID`` or
``figures/ID-quick``): its sweep, ``ID.png``, ``ID.pdf`` and ``summary.json``.

``fedopt topology show NAME --n N [--set k=v] [--mixing RULE] [--draw FILE.png]`` prints a
topology's nodes, edges, degree range and spectral gap.

Plug-ins: a component or topology named ``"my_module:factory"`` is imported from the config file's
folder and then the current folder (``run``; ``run --resume``: the original config's folder, recorded
in ``meta.json``, then the current folder; for ``sweep``: the sweep file's folder, its base config's
folder, the current folder; for ``topology show``: the current folder), which go to the front of
``sys.path`` first, so no ``PYTHONPATH`` is needed. :func:`fedopt.run`, :func:`fedopt.resume` and
:func:`fedopt.sweep.load_sweep` search the same folders (for a mapping instead of a file: the current
folder). Sweep workers get the same folders. Resolving a plug-in runs its code: a config or sweep
file is trusted input, like a script. A broken plug-in is one error line, exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from fedopt.errors import ConfigError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2 (argparse prints usage too)
        sys.stderr.write(f"fedopt: error: {message}\n")
        raise SystemExit(2)


def _default_out(config: str) -> Path:
    stem = Path(config).stem
    base = Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, i = base, 1
    while out.exists():
        i += 1
        out = base.with_name(f"{base.name}-{i}")
    return out


def _cmd_run(args: argparse.Namespace) -> int:
    from fedopt.api import resume, run

    if args.resume is not None:
        if args.config is not None or args.set or args.out:
            raise ConfigError("--resume DIR takes no CONFIG, --set or --out: the folder's config.toml is the config")
        out = Path(args.resume)
        df = resume(out, progress=not args.quiet)
    else:
        if args.config is None:
            raise ConfigError("fedopt run needs a CONFIG file, or --resume DIR to continue a run folder")
        out = Path(args.out) if args.out else _default_out(args.config)
        df = run(args.config, out=out, overrides=args.set, progress=not args.quiet)
    status = df.attrs["status"]
    last = df[df["round"] == df["round"].max()]
    shown = {m: v for m, v in zip(last.metric, last.value)
             if m in ("hypergrad_norm_sq", "inner_error", "x_error", "test_acc", "weight_auc", "outer_loss", "stationarity",
                      "worst_group_test_acc", "sliced_wasserstein", "modes_covered", "comm_rounds")}
    summary = "  ".join(f"{k}={v:.4g}" for k, v in shown.items())
    print(f"{status} in {df.attrs['wall_time_s']:.1f}s: {summary}")
    print(f"wrote {out}/ (config.toml, metrics.csv, meta.json, convergence.png)")
    return 0 if status == "finished" else 3


def _cmd_sweep(args: argparse.Namespace) -> int:
    from fedopt.sweep import check_executor, check_workers, load_sweep, run_sweep

    check_executor(args.executor, args.address)
    check_workers(args.workers)
    sweep = load_sweep(args.sweep)  # plug-ins: the sweep's, its base config's and the current folder
    out = Path(args.out) if args.out else Path("sweeps") / Path(args.sweep).stem
    dup = f" ({sweep.duplicates} duplicate points dropped)" if sweep.duplicates else ""

    def announce(pending: int) -> None:  # once the folder is claimed: after every check
        if not args.quiet:
            print(f"{len(sweep.points)} runs{dup}, {pending} to run -> {out}/", flush=True)

    report = run_sweep(sweep, out, executor=args.executor, workers=args.workers, address=args.address,
                       progress=not args.quiet, on_start=announce)
    print(f"{report.total} runs: {report.skipped} already done, {report.finished} finished, "
          f"{report.diverged} diverged, {len(report.failed)} failed in {report.wall_s:.1f}s")
    for line in report.failed:
        print(f"failed: {line}", file=sys.stderr)
    if report.tuning is not None:
        from fedopt.tuning import describe

        for line in describe(report.tuning):
            print(f"selected {line}")
        print(f"wrote {out / 'tuning.csv'}, {out / 'summary.json'}, {out / 'tuned.png'}")
    print(f"wrote {report.table_path}")
    return 1 if report.failed else 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from fedopt.errors import check
    from fedopt.figures import FIGURES, reproduce
    from fedopt.sweep import check_executor

    if args.list:
        for fig in FIGURES.values():
            print(f"{fig.id}  {fig.title}\n    data: {fig.dataset}\n    unverified: {fig.unverified}")
        return 0
    check(args.figure is not None, "give a figure id (fedopt reproduce --list shows them)")
    check_executor(args.executor, None)
    out = Path(args.out) if args.out else Path("figures") / (args.figure + ("-quick" if args.quick else ""))
    summary = reproduce(args.figure, out, quick=args.quick, executor=args.executor)
    print(f"{args.figure} in {summary['wall_time_s']:.0f}s: wrote {out}/ ({args.figure}.png, {args.figure}.pdf, "
          "summary.json)")
    return 0


def _cmd_topology_show(args: argparse.Namespace) -> int:
    import os

    from fedopt.config import _parse_value
    from fedopt.errors import check
    from fedopt.network import DEFAULT_MIXING, build_network
    from topologies.plugins import plugin_path

    params = {}
    for item in args.set:
        check("=" in item, f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        params[k.strip()] = _parse_value(v.strip())
    check(args.n >= 1, f"--n must be >= 1, got {args.n}")
    check(args.seed >= 0, f"--seed must be >= 0, got {args.seed}")
    draw = Path(args.draw) if args.draw is not None else None
    if draw is not None:  # every check on the file before any output: a refusal prints one line only
        # file types matplotlib's Agg backend writes without LaTeX or extra codecs
        DRAW_TYPES = ("eps", "jpeg", "jpg", "pdf", "png", "ps", "svg", "svgz", "tif", "tiff")
        kind = draw.suffix.lower().lstrip(".")
        check(kind in DRAW_TYPES, f"--draw {args.draw!r}: unknown file type {draw.suffix or '(none)'!r}; "
                                  f"allowed: {', '.join('.' + t for t in DRAW_TYPES)}")
        folder = draw.parent
        check(folder.is_dir(), f"--draw {args.draw!r}: the folder {str(folder)!r} does not exist")
        check(os.access(folder, os.W_OK | os.X_OK), f"--draw {args.draw!r}: the folder {str(folder)!r} is not writable")
        check(not draw.is_dir(), f"--draw {args.draw!r} is a folder; give a file name")
        check(args.force or not draw.exists(), f"--draw {args.draw!r} exists; choose a new file or add --force")
    with plugin_path(Path.cwd()):
        net = build_network(args.name, args.n, seed=args.seed, params=params, mixing=args.mixing)
    g = net.graph
    degrees = [d for _, d in g.degree]
    gap = net.spectral_gap()
    if draw is not None:
        from plots.topology import draw_graph

        try:
            draw_graph(g, draw, title=f"{args.name}, n={g.number_of_nodes()}, gap {gap:.3g}")
        except (OSError, ValueError) as e:
            raise ConfigError(f"--draw {args.draw!r}: cannot write the figure: {str(e).splitlines()[0]}") from None
    weights = "weights from params.path" if args.name == "matrix" else f"{args.mixing or DEFAULT_MIXING} weights"
    print(f"topology {args.name} ({weights}, seed {args.seed})")
    print(f"nodes {g.number_of_nodes()}  edges {g.number_of_edges()}  degree {min(degrees)}..{max(degrees)}")
    print(f"spectral gap {gap:.6g}  (rho = {1 - gap:.6g})")
    if draw is not None:
        print(f"wrote {args.draw}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedopt", description="Federated and decentralized optimization simulator.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    p = sub.add_parser("run", help="run one config and write a run folder")
    p.add_argument("config", nargs="?", help="a TOML run config (see experiments/configs/)")
    p.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the killed run of folder DIR from its last checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set algorithm.params.outer_lr=0.05 (repeatable)")
    p.add_argument("--out", help="a new folder for the outputs (default: runs/<config>-<time>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_run)
    sw = sub.add_parser("sweep", help="run a sweep of configs into one results table")
    sw.add_argument("sweep", help="sweep file (TOML: base config, [grid], [[zip]])")
    sw.add_argument("--executor", default="serial", help="serial (default), process or ray")
    sw.add_argument("--address", default=None, help="ray: an existing cluster ('auto' or 'ray://host:port')")
    sw.add_argument("--workers", type=int, default=None, help="parallel runs, >= 1 (default: the CPU count)")
    sw.add_argument("--out", default=None, help="sweep folder (default sweeps/<sweep name>; reused to resume)")
    sw.add_argument("--quiet", action="store_true", help="no progress bar")
    sw.set_defaults(func=_cmd_sweep)
    rp = sub.add_parser("reproduce", help="rerun a paper figure (fedopt reproduce --list)")
    rp.add_argument("figure", nargs="?", help="figure id, e.g. F1")
    rp.add_argument("--list", action="store_true", help="list the figures")
    rp.add_argument("--quick", action="store_true", help="small budgets: under 3 minutes on 2 cores")
    rp.add_argument("--out", default=None, help="output folder (default figures/ID[-quick]; reused to resume)")
    rp.add_argument("--executor", default="serial", help="sweep executor: serial, process or ray")
    rp.set_defaults(func=_cmd_reproduce)
    t = sub.add_parser("topology", help="inspect gossip topologies")
    tsub = t.add_subparsers(dest="topology_command", metavar="ACTION", parser_class=_Parser)
    tsub.required = True
    show = tsub.add_parser("show", help="nodes, edges, degrees and spectral gap of a topology")
    show.add_argument("name", help="ring, torus, exponential, ..., edgelist, matrix, or package.module:function")
    show.add_argument("--n", type=int, required=True, help="number of nodes")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a graph parameter (repeatable)")
    show.add_argument("--mixing", default=None, help="mixing rule (default metropolis_hastings; none for matrix)")
    show.add_argument("--seed", type=int, default=0)
    show.add_argument("--draw", metavar="FILE.png", help="draw the graph to this new file (.png, .pdf, .svg, ...)")
    show.add_argument("--force", action="store_true", help="with --draw: overwrite an existing file")
    show.set_defaults(func=_cmd_topology_show)
    return parser


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[list[int]]:
    """While the command runs, SIGTERM stops it the way SIGINT does (``results.Interrupted``, a
    ``KeyboardInterrupt``): a run folder is marked ``interrupted``, sweep workers are stopped. A
    second SIGTERM during that clean-up ends the process at once. Only in the main thread (where
    Python runs signal handlers); the previous handler is restored afterwards. Yields the list of
    signals received (a library between the handler and the caller, Ray's ``wait`` for one, may
    re-raise the exception as a plain ``KeyboardInterrupt``)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    from fedopt.results import Interrupted

    def on_term(signum: int, frame: object) -> None:
        del frame
        received.append(signum)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM: the default, immediate end
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedopt`` console script."""
    args = build_parser().parse_args(argv)
    with _sigterm_interrupts() as received:
        try:
            return int(args.func(args))
        except ConfigError as e:
            sys.stderr.write(f"fedopt: error: {e}\n")
            return 2
        except KeyboardInterrupt as e:
            signum = getattr(e, "signum", None) or (received[-1] if received else signal.SIGINT)
            sys.stderr.write(f"fedopt: interrupted ({signal.Signals(signum).name})\n")
            return 128 + signum


if __name__ == "__main__":
    raise SystemExit(main())
