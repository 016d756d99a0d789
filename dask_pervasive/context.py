"""Context declarations: what a context is called, how it is built, from what."""

from __future__ import annotations

import importlib
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import cloudpickle
import fsspec
from dask.base import tokenize
from dask.utils import parse_bytes

from ._protocol import CONTEXT_ATTR
from .devices import validate_device
from .errors import ContextDefinitionError

#: Names appear in cache paths and ``dask-peer://<name>/`` URLs (matched whole, no trailing newline).
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
#: ``"package.module:function"`` (the function part may be dotted: ``"mod:Class.method"``).
_IMPORT_RE = re.compile(rf"({_DOTTED}):({_DOTTED})")


def check_name(name: Any) -> str:
    """Return ``name`` if it is a valid context name, else raise :class:`ContextDefinitionError`."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ContextDefinitionError(
            f"Context name must match {_NAME_RE.pattern} (letters, digits, "
            f"'_', '.', '-'; at most 128 characters), got {name!r}"
        )
    return name


def import_path(spec: str) -> Any:
    """Import the object named by ``"module:attr"`` or ``"module.attr"`` (``attr`` may be dotted).

    Raises
    ------
    ValueError
        ``spec`` has neither form.
    ImportError
        The module cannot be imported here or lacks the attribute; the message
        names ``spec``.
    """
    module_name, sep, attr = spec.strip().partition(":")
    if not sep:
        module_name, _, attr = spec.strip().rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{spec!r} is not of the form 'module:attr' or 'module.attr'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(
            f"cannot import module {module_name!r} for {spec!r} on this process ({exc}); "
            "install it where this runs or put it on its PYTHONPATH",
            name=module_name,
        ) from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImportError(
                f"module {module_name!r} has no attribute {attr!r} (from {spec!r})", name=module_name
            ) from None
    return obj


@dataclass(frozen=True)
class ImportedCallable:
    """A ``load``/``teardown`` given as ``"module:function"``, imported where it is called.

    The module may exist only on the workers, so the client checks just the
    form; the worker imports it on first use, and a failure there becomes a
    :class:`~dask_pervasive.ContextLoadError` naming the import path.
    """

    spec: str

    @property
    def token(self) -> str:
        # Same identity as the function itself (see _qualname): "module.function".
        module, _, attr = self.spec.partition(":")
        return f"{module}.{attr}"

    def resolve(self) -> Callable[..., Any]:
        """Import and return the callable (``ImportError``/``TypeError`` naming ``spec``)."""
        obj = import_path(self.spec)
        if not callable(obj):
            raise TypeError(f"{self.spec!r} is a {type(obj).__name__}, not a callable")
        return obj

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)


def _check_callable(value: Any, what: str, name: str) -> Callable[..., Any]:
    if isinstance(value, str):
        if _IMPORT_RE.fullmatch(value.strip()):
            return ImportedCallable(value.strip())
        raise ContextDefinitionError(
            f"Context {name!r}: {what} must be callable or a 'module:function' string "
            f"importable on the workers, got {value!r}",
            name,
        )
    if not callable(value):
        raise ContextDefinitionError(
            f"Context {name!r}: {what} must be callable (or a 'module:function' string), got {type(value).__name__}",
            name,
        )
    try:
        cloudpickle.dumps(value)
    except Exception as exc:
        raise ContextDefinitionError(
            f"Context {name!r}: {what}={value!r} cannot be pickled to send it to "
            f"workers ({type(exc).__name__}: {exc}); use a module-level function "
            "importable on the workers (or its 'module:function' name)",
            name,
        ) from exc
    return value


#: fsspec protocols whose backend is a separate package, and the extra of ours that installs it.
_BACKEND_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}


def _check_source(source: str, storage_options: Mapping | None, name: str) -> None:
    if not isinstance(source, str) or not source.strip():
        raise ContextDefinitionError(f"Context {name!r}: source must be a non-empty URL string", name)
    if storage_options is not None and not isinstance(storage_options, Mapping):
        raise ContextDefinitionError(
            f"Context {name!r}: storage_options must be a mapping, got {type(storage_options).__name__}", name
        )
    if storage_options:
        try:
            cloudpickle.dumps(dict(storage_options))
        except Exception as exc:
            raise ContextDefinitionError(
                f"Context {name!r}: storage_options cannot be pickled to send them to workers "
                f"({type(exc).__name__}: {exc}); pass plain values (strings, numbers, "
                "credentials) that the workers can use to open their own connections",
                name,
            ) from exc
    parts = source.split("::")
    for i, part in enumerate(parts):
        protocol, path = fsspec.core.split_protocol(part)
        # Only the last link names a storage location; an empty path in an outer
        # link ("zip://::file:///m.zip") is the root of the archive it opens.
        if i == len(parts) - 1 and (not path or not path.strip("/")):
            raise ContextDefinitionError(f"Context {name!r}: source {source!r} has no path", name)
        try:
            fsspec.get_filesystem_class(protocol or "file")
        except (ValueError, ImportError) as exc:
            extra = _BACKEND_EXTRAS.get(protocol or "")
            hint = f" (pip install dask-pervasive[{extra}])" if extra else ""
            raise ContextDefinitionError(f"Context {name!r}: cannot read source {source!r}: {exc}{hint}", name) from exc


def _check_nbytes(nbytes: Any, name: str) -> int | None:
    if nbytes is None:
        return None
    try:
        if isinstance(nbytes, bool):
            raise TypeError("a bool is not a size")
        if isinstance(nbytes, str):
            value = parse_bytes(nbytes)
        elif isinstance(nbytes, float):
            if not nbytes.is_integer():
                raise ValueError("a size in bytes must be a whole number")
            value = int(nbytes)
        else:
            value = int(nbytes)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ContextDefinitionError(
            f"Context {name!r}: bad nbytes {nbytes!r} ({exc}); give bytes as an int or a string like '2GiB'",
            name,
        ) from exc
    if value <= 0:
        raise ContextDefinitionError(f"Context {name!r}: nbytes must be positive, got {nbytes!r}", name)
    return value


class Context:
    """A named, expensive-to-build object kept resident on workers.

    Parameters
    ----------
    name
        Unique name; letters, digits, ``_``, ``.``, ``-`` (it appears in paths
        and ``dask-peer://`` URLs).
    load
        ``load(path, device) -> object``. ``path`` is the local copy of
        ``source`` on the worker (a file or directory), or ``None`` without a
        source; ``device`` is the resolved device (``"cpu"``, ``"cuda:0"``…).
        Must be picklable; a module-level function importable on workers is
        best. A ``"package.module:function"`` string is imported on the
        worker when the context is first loaded (for modules installed only
        there); a failed import there is a ``ContextLoadError`` naming it.
    source
        fsspec URL of the file or directory the context is built from.
        Copied into the worker's cache directory before ``load`` runs.
    storage_options
        Passed to fsspec for ``source``.
    device
        ``"auto"`` (this worker's GPU if any, else CPU), ``"cpu"``,
        ``"cuda"`` or ``"cuda:N"``.
    nbytes
        Size estimate (int or ``"2GiB"``) used to make room before loading and
        to refuse contexts that can never fit; measured after load when
        ``None``.
    teardown
        ``teardown(obj)`` run when the context is evicted.

    Examples
    --------
    >>> def load_index(path, device):
    ...     import numpy as np
    ...     return np.load(path)
    >>> ctx = Context("index", load=load_index, source="file:///data/index.npy")
    >>> ctx.name
    'index'
    """

    def __init__(
        self,
        name: str,
        load: Callable[[str | None, str], Any],
        source: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        device: str = "auto",
        nbytes: int | str | None = None,
        teardown: Callable[[Any], None] | None = None,
    ) -> None:
        check_name(name)
        load = _check_callable(load, "load", name)
        if teardown is not None:
            teardown = _check_callable(teardown, "teardown", name)
        if source is not None:
            _check_source(source, storage_options, name)
        elif storage_options:
            raise ContextDefinitionError(f"Context {name!r}: storage_options given without source", name)
        try:
            validate_device(device)
        except ValueError as exc:
            raise ContextDefinitionError(f"Context {name!r}: {exc}", name) from None
        nbytes = _check_nbytes(nbytes, name)
        self.name = name
        self.load = load
        self.source = source
        self.storage_options = dict(storage_options or {})
        self.device = device
        self.nbytes = nbytes
        self.teardown = teardown

    @property
    def token(self) -> str:
        """Deterministic identity of the declaration, to detect conflicting redefinitions."""
        return tokenize(
            type(self).__name__,
            self.name,
            _qualname(self.load),
            self.source,
            self.storage_options,
            self.device,
            self.nbytes,
            _qualname(self.teardown),
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Context) and other.token == self.token

    def __hash__(self) -> int:
        return hash(self.token)

    def __repr__(self) -> str:
        src = f", source={self.source!r}" if self.source else ""
        return f"{type(self).__name__}({self.name!r}{src}, device={self.device!r})"

    def describe(self) -> str:
        """Every field that makes the definition, for messages about conflicting definitions."""
        parts = [repr(self.name), f"load={_qualname(self.load)}"]
        if self.source is not None:
            parts.append(f"source={self.source!r}")
        if self.storage_options:
            parts.append(f"storage_options=<{len(self.storage_options)} keys>")
        parts.append(f"device={self.device!r}")
        if self.nbytes is not None:
            parts.append(f"nbytes={self.nbytes}")
        if self.teardown is not None:
            parts.append(f"teardown={_qualname(self.teardown)}")
        return f"{type(self).__name__}({', '.join(parts)})"


def _qualname(fn: Any) -> str | None:
    if fn is None:
        return None
    if hasattr(fn, "token"):  # our own loaders describe themselves
        return fn.token
    if hasattr(fn, "__qualname__"):  # functions: identity is where they live
        return f"{getattr(fn, '__module__', '')}.{fn.__qualname__}"
    return tokenize(fn)  # callable objects: their pickled state


@dataclass
class LoadedModel:
    """What :class:`TransformersContext` puts in the cache.

    Attributes
    ----------
    model
        ``torch.nn.Module`` in eval mode with gradients off, on ``device``.
        Run it under ``torch.inference_mode()``.
    tokenizer
        The tokenizer saved with the model, or ``None`` when there is none.
    device
        The device the model lives on.
    """

    model: Any
    tokenizer: Any
    device: str


# transformers builds models under process-global init contexts (meta device,
# default dtype) that are not thread-safe: two threads of one worker loading
# different models at once corrupt each other. Serialize loads per process.
_TRANSFORMERS_LOAD_LOCK = threading.Lock()

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model")


@dataclass(frozen=True)
class TransformersLoader:
    """Picklable ``load`` callable used by :class:`TransformersContext`."""

    model_class: str = "AutoModelForCausalLM"
    torch_dtype: str = "float32"
    tokenizer: bool = True
    model_kwargs: tuple = ()

    @property
    def token(self) -> str:
        return tokenize(type(self).__name__, self.model_class, self.torch_dtype, self.tokenizer, self.model_kwargs)

    def __call__(self, path: str | None, device: str) -> LoadedModel:
        import os

        import torch

        dtype = self.torch_dtype if self.torch_dtype == "auto" else getattr(torch, self.torch_dtype)
        with _TRANSFORMERS_LOAD_LOCK:
            # transformers' lazy module is not thread-safe on first import: concurrent loads
            # import it and look the class up one at a time too.
            import transformers

            cls = _model_class(transformers, self.model_class)
            transformers = sys.modules.get("transformers", transformers)  # settled now (see _model_class)
            hf_logging = transformers.utils.logging
            # A progress bar per load floods worker logs; restore the user's setting after.
            bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
            try:
                model = cls.from_pretrained(path, dtype=dtype, **dict(self.model_kwargs))
            finally:
                if bars:
                    hf_logging.enable_progress_bar()
            model.to(device)
            model.eval()
            model.requires_grad_(False)
            tok = None
            if (
                self.tokenizer
                and os.path.isdir(path)
                and any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES)
            ):
                tok = _model_class(transformers, "AutoTokenizer", "tokenizer class").from_pretrained(path)
        return LoadedModel(model=model, tokenizer=tok, device=device)


#: How long a model class transformers exports may stay unresolvable (another thread's first import).
_CLASS_LOOKUP_SECONDS = 30.0


def _model_class(transformers: Any, name: str, what: str = "model class") -> Any:
    """``transformers.<name>``, waiting out another thread's first import of transformers.

    Our lock orders our own loads, but any other thread of the process (a
    task's module being unpickled, user code) may import transformers at the
    same time, and its lazy module is not thread-safe then: ``import
    transformers`` can hand back the module still being initialised, which the
    lazy module replaces in ``sys.modules`` when done, so each try reads it
    from there again (seen with transformers 4.56 in worker processes). While
    transformers is still settling (not yet its lazy module, or initialising),
    or for a name it exports, the lookup is retried with backoff for a bounded
    time; any other name fails at once.
    """
    deadline = time.monotonic() + _CLASS_LOOKUP_SECONDS
    delay = 0.01
    while True:
        module = sys.modules.get("transformers", transformers)
        try:
            return getattr(module, name)
        except AttributeError as exc:
            spec = getattr(module, "__spec__", None)
            settling = not hasattr(module, "_class_to_module") or bool(getattr(spec, "_initializing", False))
            if not (settling or name in dir(module)) or time.monotonic() + delay > deadline:
                why = "" if settling else " (not among the names it exports)"
                raise ValueError(f"transformers has no {what} {name!r}{why}") from exc
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


def _release_model(obj: LoadedModel) -> None:
    # Drop the references the cache cannot see; the cache then runs gc and
    # torch.cuda.empty_cache() so GPU memory really goes back.
    obj.model = None
    obj.tokenizer = None


class TransformersContext(Context):
    """A Hugging Face ``transformers`` model (and tokenizer) as a context.

    The files under ``source`` (a directory written by ``save_pretrained``)
    are copied to the worker through fsspec, then loaded with
    ``<model_class>.from_pretrained`` onto the worker's device in eval mode.
    :func:`~dask_pervasive.get_context` returns a :class:`LoadedModel`.

    Parameters
    ----------
    name, source, storage_options, device, nbytes
        As for :class:`Context`; ``source`` is required.
    model_class
        Name of a ``transformers`` class with ``from_pretrained``
        (``"AutoModelForCausalLM"``, ``"AutoModel"``, …).
    torch_dtype
        ``"float32"``, ``"float16"``, ``"bfloat16"`` or ``"auto"``.
    tokenizer
        Load the tokenizer too when its files are present.
    model_kwargs
        Extra keyword arguments for ``from_pretrained``.

    Examples
    --------
    >>> gpt = TransformersContext("gpt", source="file:///models/gpt2")  # doctest: +SKIP
    >>> def generate(prompt):  # doctest: +SKIP
    ...     import torch
    ...     ctx = dask_pervasive.get_context("gpt")
    ...     ids = ctx.tokenizer(prompt, return_tensors="pt").to(ctx.device)
    ...     with torch.inference_mode():
    ...         return ctx.model.generate(**ids, max_new_tokens=8)
    """

    def __init__(
        self,
        name: str,
        source: str,
        model_class: str = "AutoModelForCausalLM",
        torch_dtype: str = "float32",
        device: str = "auto",
        storage_options: Mapping[str, Any] | None = None,
        nbytes: int | str | None = None,
        tokenizer: bool = True,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        check_name(name)
        if source is None:
            raise ContextDefinitionError(f"TransformersContext {name!r} needs a source", name)
        if not isinstance(model_class, str) or not model_class.isidentifier():
            raise ContextDefinitionError(
                f"TransformersContext {name!r}: model_class must be a transformers class name, got {model_class!r}",
                name,
            )
        if torch_dtype not in ("auto", "float32", "float16", "bfloat16", "float64"):
            raise ContextDefinitionError(f"TransformersContext {name!r}: unsupported torch_dtype {torch_dtype!r}", name)
        if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
            raise ContextDefinitionError(f"TransformersContext {name!r}: model_kwargs must be a mapping", name)
        loader = TransformersLoader(
            model_class=model_class,
            torch_dtype=torch_dtype,
            tokenizer=bool(tokenizer),
            model_kwargs=tuple(sorted((model_kwargs or {}).items())),
        )
        super().__init__(
            name,
            load=loader,
            source=source,
            storage_options=storage_options,
            device=device,
            nbytes=nbytes,
            teardown=_release_model,
        )
        self.model_class = model_class
        self.torch_dtype = torch_dtype


def context_of(func: Any) -> str | None:
    """The context a :func:`~dask_pervasive.uses_context`-decorated function needs, else ``None``.

    Here rather than in :mod:`dask_pervasive.task` so that the scheduler half
    can read task specs without importing the worker half.
    """
    return getattr(func, CONTEXT_ATTR, None)
