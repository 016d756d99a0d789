"""``--preload dask_pervasive.preload``: set dask_pervasive up from the command line.

On a worker (``dask worker ADDRESS --preload dask_pervasive.preload``) it
installs :class:`~dask_pervasive.ContextWorkerPlugin` with the contexts
declared in ``dask.config`` (``pervasive.contexts``) and/or with
``--pervasive-contexts MODULE:ATTR``. On a scheduler (``dask scheduler
--preload dask_pervasive.preload``) it adds
:class:`~dask_pervasive.ContextSchedulerPlugin`, the Prometheus collector
(:mod:`dask_pervasive.metrics`) and the ``/pervasive`` page
(:mod:`dask_pervasive.dashboard`).

``pervasive.contexts`` is a list whose items are either mappings of
:class:`~dask_pervasive.Context` keyword arguments (``load``/``teardown``
given as ``"module:function"`` or ``"module.function"``; ``kind:
transformers`` builds a :class:`~dask_pervasive.TransformersContext`) or
``"module:attr"`` strings naming a Context or a list of them. A single such
string, or the YAML/JSON text of a list (as an environment variable gives
it), is accepted too::

    pervasive:
      contexts:
        - name: llm
          load: mypkg.models:load_llm
          source: s3://bucket/llm/
          nbytes: 8GiB
        - name: gpt
          kind: transformers
          source: file:///models/gpt2
        - mypkg.contexts:EXTRA

Caveat (distributed's CLI): with ``dask worker --scheduler-file FILE``, click
hands the first unknown option to the positional ``SCHEDULER`` argument, so
``--pervasive-contexts`` breaks there. Give the scheduler address instead, or
declare the contexts in config (``DASK_PERVASIVE__CONTEXTS=mypkg.contexts:CONTEXTS``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import click
import yaml
from distributed import Scheduler, Worker
from distributed.core import Status

from . import config
from ._protocol import PLUGIN_NAME
from .context import Context, TransformersContext, import_path
from .scheduler import ContextSchedulerPlugin
from .worker import ContextDeclaration, ContextWorkerPlugin, _check_contexts, plugin_on

if TYPE_CHECKING:
    from distributed.core import Server

logger = logging.getLogger(__name__)

#: ``dask.config`` key holding the declared contexts.
CONFIG_KEY = "pervasive.contexts"
#: The click option of :func:`dask_setup`.
OPTION = "--pervasive-contexts"

_KINDS: dict[str, type[Context]] = {"context": Context, "transformers": TransformersContext}
_CALLABLE_FIELDS = ("load", "teardown")
_CLOSING = (Status.closing, Status.closed, Status.closing_gracefully, Status.failed)
_background: set[asyncio.Task] = set()


# -- declarations ---------------------------------------------------------------
def import_object(spec: str, where: str) -> Any:
    """Import the object named by ``"module:attr"`` or ``"module.attr"``.

    Parameters
    ----------
    spec
        ``"package.module:name"`` (``name`` may be dotted) or
        ``"package.module.name"``.
    where
        What the value came from, for error messages.

    Raises
    ------
    ValueError
        ``spec`` is malformed, the module cannot be imported or lacks the
        attribute; the message names ``where`` and ``spec``.
    """
    if not isinstance(spec, str):
        raise TypeError(f"{where}: expected 'module:attr', got {type(spec).__name__} {spec!r}")
    try:
        return import_path(spec)
    except (ImportError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from exc


def _as_contexts(obj: Any, where: str) -> list[Context]:
    """A Context or a list/tuple of them, as a list."""
    if isinstance(obj, Context):
        return [obj]
    if isinstance(obj, (list, tuple)) and all(isinstance(c, Context) for c in obj):
        return list(obj)
    raise TypeError(f"{where}: expected a dask_pervasive.Context or a list of them, got {type(obj).__name__}")


def _allowed_keywords(cls: type[Context]) -> set[str]:
    return {p for p in inspect.signature(cls.__init__).parameters if p != "self"}


def context_from_mapping(entry: Mapping[str, Any], where: str) -> Context:
    """Build a Context from a config mapping of its keyword arguments.

    Keys may use hyphens (``storage-options``); ``kind`` is ``"context"``
    (default) or ``"transformers"``; ``load``/``teardown`` strings are
    imported with :func:`import_object`.

    Raises
    ------
    ValueError, TypeError
        With ``where`` and the offending key in the message.
    """
    kwargs = {str(k).replace("-", "_"): v for k, v in entry.items()}
    kind = kwargs.pop("kind", "context")
    cls = _KINDS.get(kind)
    if cls is None:
        raise ValueError(f"{where}: unknown kind {kind!r}; use one of {sorted(_KINDS)}")
    unknown = set(kwargs) - _allowed_keywords(cls)
    if unknown:
        allowed = ", ".join(sorted(_allowed_keywords(cls)))
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)} for {cls.__name__} (allowed: {allowed})")
    if "name" not in kwargs:
        raise ValueError(f"{where}: a context needs a 'name'")
    for field in _CALLABLE_FIELDS:
        if isinstance(kwargs.get(field), str):
            kwargs[field] = import_object(kwargs[field], f"{where}.{field}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{where}: {exc}") from exc


def parse_contexts(value: Any, where: str) -> list[Context]:
    """Turn a ``pervasive.contexts`` value or ``--pervasive-contexts`` value into Contexts.

    Accepts ``None``; a Context; a mapping; a ``"module:attr"`` string; the
    YAML/JSON text of a list; or a list mixing those.

    Examples
    --------
    >>> entries = [{"name": "gpt", "kind": "transformers", "source": "file:///models/gpt2"}]
    >>> [type(c).__name__ for c in parse_contexts(entries, "example")]
    ['TransformersContext']
    """
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text[0] not in "[{-":  # not a YAML/JSON list or mapping: an import path
            return _as_contexts(import_object(text, where), where)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"{where}: cannot parse {text!r} as YAML/JSON: {exc}") from exc
    if isinstance(value, (Context, Mapping)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{where}: expected a list of contexts, got {type(value).__name__} {value!r}")
    out: list[Context] = []
    for i, item in enumerate(value):
        item_where = f"{where}[{i}]"
        if isinstance(item, Context):
            out.append(item)
        elif isinstance(item, Mapping):
            out.append(context_from_mapping(item, item_where))
        elif isinstance(item, str):
            out.extend(_as_contexts(import_object(item, item_where), item_where))
        else:
            raise TypeError(f"{item_where}: expected a mapping or 'module:attr', got {type(item).__name__}")
    return out


def contexts_from_config() -> list[Context]:
    """The contexts declared in ``dask.config`` under ``pervasive.contexts``."""
    return parse_contexts(config.get("contexts"), f"dask config {CONFIG_KEY!r}")


def _option_callback(ctx: click.Context, param: click.Parameter, value: Sequence[str]) -> list[Context] | None:
    # Runs when `dask worker` parses its command line (distributed validates
    # preload arguments up front), so a bad value stops the CLI with a usage
    # error naming it, before any worker starts.
    if not value:
        return None
    try:
        return [c for spec in value for c in parse_contexts(spec, f"{OPTION} {spec!r}")]
    except (ValueError, TypeError) as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc


# -- worker ------------------------------------------------------------------------
def preimport(contexts: Iterable[Context]) -> list[str]:
    """Import now what the first load of ``contexts`` would import in its load thread.

    The first ``import torch`` / ``import transformers`` of a process holds
    the GIL for seconds (extension modules initialise under it): in a load
    thread it stalls the worker's event loop (``Event loop was unresponsive``;
    heartbeats and peer serving wait). A preload runs before the worker
    registers, when nothing depends on its loop yet, and distributed starts
    measuring the loop's ticks only after that. Only
    :class:`~dask_pervasive.TransformersContext` loads are known ahead; a
    missing package is left for the load to report.

    Returns
    -------
    The modules imported (or already imported).
    """
    import importlib

    classes = {c.load.model_class for c in contexts if isinstance(c, TransformersContext)}
    if not classes:
        return []
    done = []
    for module in ("torch", "transformers", "safetensors"):
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        done.append(module)
    if "transformers" in done:
        import transformers

        for name in sorted(classes | {"AutoTokenizer"}):  # the lazy module imports each class's module on access
            try:
                getattr(transformers, name)
            except AttributeError:
                continue
    return done


async def setup_worker(worker: Worker, contexts: Iterable[Context] = ()) -> ContextWorkerPlugin:
    """Install :class:`ContextWorkerPlugin` on ``worker`` with config and given contexts.

    The plugin is installed right away, so it is in place before the worker
    can receive any task. But a preload runs before the worker registers
    with the scheduler (``Worker.start_unsafe`` runs preloads, then plugins
    passed to the constructor, then ``_register_with_scheduler``), and until
    then ``worker.log_event`` is dropped silently: the ``worker-budget``
    event that the plugin's ``setup`` sends never reaches the scheduler.
    A background task therefore waits for the registration to complete and
    announces the worker's state again (see :func:`_announce_when_registered`).

    Each context is also installed as a worker-local
    :class:`~dask_pervasive.worker.ContextDeclaration`, as
    :func:`dask_pervasive.register` does cluster-wide, so a plugin that
    replaces ours (registration, or a later :func:`dask_pervasive.install`)
    declares them too (see ``ContextWorkerPlugin.setup``), which also adds the
    counters to the worker's heartbeats.
    """
    contexts = _check_contexts([*contexts_from_config(), *contexts])
    preimport(contexts)
    await worker.plugin_add(ContextWorkerPlugin(contexts), name=PLUGIN_NAME, catch_errors=False)
    for ctx in contexts:
        await worker.plugin_add(ContextDeclaration(ctx), catch_errors=False)
    _spawn(_announce_when_registered(worker))
    logger.info("pervasive: preload installed contexts %s on %s", [c.name for c in contexts], worker.address)
    return worker.plugins[PLUGIN_NAME]  # type: ignore[return-value]


def _registered(worker: Worker) -> bool:
    # `_register_with_scheduler` sets the status to running, installs the
    # scheduler's worker plugins, then starts the heartbeat: once it runs,
    # registration is complete and any plugin replacement has happened.
    heartbeat = worker.periodic_callbacks.get("heartbeat")
    return worker.status in (Status.running, Status.paused) and heartbeat is not None and heartbeat.is_running()


async def _announce_when_registered(worker: Worker) -> None:
    """Re-send what the scheduler missed while the worker was not registered yet.

    If the scheduler already held a ``"pervasive"`` worker plugin (someone
    called :func:`dask_pervasive.install`), registration replaced ours with
    it; that one declared the preload's contexts from their declarations.
    """
    delay = 0.005
    while not _registered(worker):
        if worker.status in _CLOSING:
            return
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.02)
    plugin = plugin_on(worker)
    if plugin is None:
        logger.warning("pervasive: ContextWorkerPlugin disappeared from %s before registration", worker.address)
        return
    plugin.announce()


def _spawn(coro: Any) -> None:
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)


# -- scheduler ------------------------------------------------------------------------
def setup_scheduler(scheduler: Scheduler) -> ContextSchedulerPlugin:
    """Add :class:`ContextSchedulerPlugin` (which adds its Prometheus metrics and the ``/pervasive`` page).

    A preload's ``dask_setup`` runs before the scheduler starts its plugins,
    so adding the plugin is enough: its ``start()`` runs with the others.
    Idempotent: an existing ``"pervasive"`` plugin is kept.
    """
    plugin = scheduler.plugins.get(PLUGIN_NAME)
    if not isinstance(plugin, ContextSchedulerPlugin):
        plugin = ContextSchedulerPlugin()
        scheduler.add_plugin(plugin, name=PLUGIN_NAME)
    return plugin


# -- preload entry points ----------------------------------------------------------------
@click.command(name="dask_setup")
@click.option(
    OPTION,
    "pervasive_contexts",
    multiple=True,
    metavar="MODULE:ATTR",
    callback=_option_callback,
    help="Contexts for this worker: a dask_pervasive.Context or a list of them, importable as MODULE:ATTR "
    "(repeatable); added to those of the 'pervasive.contexts' config.",
)
async def dask_setup(server: Server, pervasive_contexts: list[Context] | None = None) -> None:
    """Preload entry point: set up dask_pervasive on a worker or a scheduler.

    Examples
    --------
    ::

        dask scheduler --preload dask_pervasive.preload
        dask worker tcp://10.0.0.1:8786 --preload dask_pervasive.preload --pervasive-contexts mypkg.ctx:CONTEXTS
    """
    if isinstance(server, Worker):
        await setup_worker(server, pervasive_contexts or ())
    elif isinstance(server, Scheduler):
        if pervasive_contexts:
            logger.warning("pervasive: %s only applies to workers; ignored on the scheduler", OPTION)
        setup_scheduler(server)
    else:
        raise TypeError(
            f"dask_pervasive.preload sets up a Worker or a Scheduler, got {type(server).__name__} "
            "(use --preload, not --preload-nanny)"
        )


def dask_teardown(server: Server) -> None:
    """Preload exit point: drop the scheduler's Prometheus collector."""
    plugin = server.plugins.get(PLUGIN_NAME) if isinstance(server, Scheduler) else None
    if plugin is not None:
        from .metrics import unregister_metrics

        unregister_metrics(plugin)
