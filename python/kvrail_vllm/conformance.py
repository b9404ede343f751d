"""Conformance of a KV connector against vLLM's ``KVConnectorBase_V1``, by parsing.

Importing vLLM needs torch (the CUDA build from PyPI, several GB), so kvrail checks
its connector against the pinned release's ``kv_connector/v1/base.py`` as source
text: Python's ``ast`` reads the base class, lists its abstract methods and the
exact signature of every method it defines, and compares a connector class (also
read as source) against that list. Nothing here imports vLLM, torch or the module
under test; importing this module has no side effects.

Signatures are compared as written: parameter names, kinds (positional-only,
positional-or-keyword, ``*args``, keyword-only, ``**kwargs``), defaults as source
text, and, unless asked not to, annotations and return annotations as source text
(a string annotation such as ``"Request"`` is compared by its content, so it equals
``Request``). Method kinds (plain, ``classmethod``, ``staticmethod``, ``property``)
must match too.
"""

from __future__ import annotations

import ast
import copy
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from kvrail_vllm import PINNED_VLLM_VERSION

BASE_CLASS = "KVConnectorBase_V1"
HMA_CLASS = "SupportsHMA"
BASE_MEMBER = "vllm/distributed/kv_transfer/kv_connector/v1/base.py"
FACTORY_MEMBER = "vllm/distributed/kv_transfer/kv_connector/factory.py"

WHEEL_DIR_ENV = "KVRAIL_VLLM_WHEEL_DIR"
WHEEL_ENV = "KVRAIL_VLLM_WHEEL"
DEFAULT_WHEEL_DIR = Path("~/.cache/kvrail/wheels")

POSITIONAL_ONLY = "positional_only"
POSITIONAL_OR_KEYWORD = "positional_or_keyword"
VAR_POSITIONAL = "var_positional"
KEYWORD_ONLY = "keyword_only"
VAR_KEYWORD = "var_keyword"

METHOD = "method"
CLASSMETHOD = "classmethod"
STATICMETHOD = "staticmethod"
PROPERTY = "property"

_ABSTRACT_DECORATORS = {
    "abstractmethod",
    "abc.abstractmethod",
    "abstractproperty",
    "abc.abstractproperty",
    "abstractclassmethod",
    "abc.abstractclassmethod",
    "abstractstaticmethod",
    "abc.abstractstaticmethod",
}


class ConformanceError(Exception):
    """The source could not be read or the class it names is not in it."""


@dataclass(frozen=True)
class Param:
    """One parameter as written: name, kind, default and annotation as source text."""

    name: str
    kind: str
    default: str | None = None
    annotation: str | None = None

    def render(self, with_annotation: bool = True) -> str:
        prefix = {VAR_POSITIONAL: "*", VAR_KEYWORD: "**"}.get(self.kind, "")
        text = prefix + self.name
        if with_annotation and self.annotation is not None:
            text += f": {self.annotation}"
        if self.default is not None:
            text += f" = {self.default}" if with_annotation and self.annotation else f"={self.default}"
        return text


@dataclass(frozen=True)
class MethodSig:
    """A method of a class body: its kind, abstractness and full signature."""

    name: str
    kind: str
    abstract: bool
    is_async: bool
    params: tuple[Param, ...]
    returns: str | None
    lineno: int
    owner: str

    def render(self, with_annotations: bool = True) -> str:
        """The signature as one line of Python (kinds' markers ``/`` and ``*`` included)."""
        parts: list[str] = []
        prev_kind = None
        for param in self.params:
            if prev_kind == POSITIONAL_ONLY and param.kind != POSITIONAL_ONLY:
                parts.append("/")
            if param.kind == KEYWORD_ONLY and prev_kind not in (KEYWORD_ONLY, VAR_POSITIONAL):
                parts.append("*")
            parts.append(param.render(with_annotations))
            prev_kind = param.kind
        if prev_kind == POSITIONAL_ONLY:
            parts.append("/")
        text = f"{'async ' if self.is_async else ''}def {self.name}({', '.join(parts)})"
        if with_annotations and self.returns is not None:
            text += f" -> {self.returns}"
        return text


@dataclass
class ClassSpec:
    """The methods a class body defines, in source order, keyed by name."""

    name: str
    bases: tuple[str, ...]
    lineno: int
    methods: dict[str, MethodSig] = field(default_factory=dict)

    @property
    def abstract_methods(self) -> list[str]:
        return [name for name, sig in self.methods.items() if sig.abstract]


@dataclass(frozen=True)
class Problem:
    """One way a connector class departs from its base."""

    kind: str  # "missing_abstract", "kind_mismatch", "signature_mismatch"
    method: str
    message: str


@dataclass
class ConformanceReport:
    base: str
    impl: str
    checked: list[str]
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        if self.ok:
            return f"{self.impl} conforms to {self.base} ({len(self.checked)} methods checked)"
        lines = [f"{self.impl} does not conform to {self.base}:"]
        lines += [f"  - {p.method}: {p.message}" for p in self.problems]
        return "\n".join(lines)


# ---------------------------------------------------------------- reading sources


def read_source(path: str | os.PathLike[str], member: str = BASE_MEMBER) -> str:
    """The text of a ``.py`` file, or of ``member`` inside a wheel (a zip file)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConformanceError(f"{path} does not exist")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as wheel:
            try:
                return wheel.read(member).decode("utf-8")
            except KeyError:
                raise ConformanceError(
                    f"{path} has no member {member}: is it a vLLM wheel of the "
                    f"pinned release {PINNED_VLLM_VERSION}?"
                ) from None
    return path.read_text(encoding="utf-8")


def find_pinned_wheel() -> Path | None:
    """The pinned vLLM wheel if it is on disk: ``$KVRAIL_VLLM_WHEEL``, else the one
    for ``PINNED_VLLM_VERSION`` in ``$KVRAIL_VLLM_WHEEL_DIR`` (default
    ``~/.cache/kvrail/wheels``). None when absent (it is downloaded by
    ``pip download --no-deps vllm==PINNED_VLLM_VERSION -d DIR``)."""
    explicit = os.environ.get(WHEEL_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        return path if path.is_file() else None
    directory = Path(os.environ.get(WHEEL_DIR_ENV, DEFAULT_WHEEL_DIR)).expanduser()
    if not directory.is_dir():
        return None
    wheels = sorted(directory.glob(f"vllm-{PINNED_VLLM_VERSION}-*.whl"))
    return wheels[0] if wheels else None


# ---------------------------------------------------------------- parsing


class _ForwardRefs(ast.NodeTransformer):
    """Replace string forward references (``"Request"``, ``type['PromMetric']``) by
    the expression they name, so quoting does not count as a difference. Strings
    inside ``Literal[...]`` are values, not references, and stay as they are."""

    def visit_Subscript(self, node: ast.Subscript) -> ast.AST:
        name = ast.unparse(node.value)
        if name in ("Literal", "typing.Literal", "typing_extensions.Literal"):
            return node
        return self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        if isinstance(node.value, str):
            try:
                parsed = ast.parse(node.value, mode="eval").body
            except SyntaxError:
                return node
            return self.visit(parsed)
        return node


def _annotation_text(node: ast.expr | None) -> str | None:
    if node is None:
        return None
    return ast.unparse(_ForwardRefs().visit(copy.deepcopy(node)))


def _params(args: ast.arguments) -> tuple[Param, ...]:
    positional = [*args.posonlyargs, *args.args]
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(args.defaults))
    defaults += list(args.defaults)
    out: list[Param] = []
    for index, (arg, default) in enumerate(zip(positional, defaults)):
        kind = POSITIONAL_ONLY if index < len(args.posonlyargs) else POSITIONAL_OR_KEYWORD
        out.append(
            Param(
                name=arg.arg,
                kind=kind,
                default=None if default is None else ast.unparse(default),
                annotation=_annotation_text(arg.annotation),
            )
        )
    if args.vararg is not None:
        out.append(Param(args.vararg.arg, VAR_POSITIONAL, None, _annotation_text(args.vararg.annotation)))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        out.append(
            Param(
                name=arg.arg,
                kind=KEYWORD_ONLY,
                default=None if default is None else ast.unparse(default),
                annotation=_annotation_text(arg.annotation),
            )
        )
    if args.kwarg is not None:
        out.append(Param(args.kwarg.arg, VAR_KEYWORD, None, _annotation_text(args.kwarg.annotation)))
    return tuple(out)


def _method(node: ast.FunctionDef | ast.AsyncFunctionDef, owner: str) -> MethodSig:
    decorators = [ast.unparse(d) for d in node.decorator_list]
    kind = METHOD
    for decorator in decorators:
        if decorator in ("classmethod", "abstractclassmethod", "abc.abstractclassmethod"):
            kind = CLASSMETHOD
        elif decorator in ("staticmethod", "abstractstaticmethod", "abc.abstractstaticmethod"):
            kind = STATICMETHOD
        elif decorator in (
            "property",
            "functools.cached_property",
            "cached_property",
            "abstractproperty",
            "abc.abstractproperty",
        ):
            kind = PROPERTY
    return MethodSig(
        name=node.name,
        kind=kind,
        abstract=any(d in _ABSTRACT_DECORATORS for d in decorators),
        is_async=isinstance(node, ast.AsyncFunctionDef),
        params=_params(node.args),
        returns=_annotation_text(node.returns),
        lineno=node.lineno,
        owner=owner,
    )


def _class_nodes(source: str, filename: str) -> dict[str, ast.ClassDef]:
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as err:
        raise ConformanceError(f"{filename} does not parse: {err}") from err
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def _spec(node: ast.ClassDef) -> ClassSpec:
    spec = ClassSpec(
        name=node.name,
        bases=tuple(ast.unparse(b) for b in node.bases),
        lineno=node.lineno,
    )
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
            # A later definition (e.g. a property's setter) replaces an earlier one
            # of the same name in the class namespace; keep the getter's signature.
            if item.name in spec.methods and any(
                ast.unparse(d).endswith((".setter", ".deleter")) for d in item.decorator_list
            ):
                continue
            spec.methods[item.name] = _method(item, node.name)
    return spec


def parse_class(source: str, class_name: str = BASE_CLASS, filename: str = "<source>") -> ClassSpec:
    """The methods ``class_name`` defines in its own body (not inherited ones)."""
    classes = _class_nodes(source, filename)
    if class_name not in classes:
        raise ConformanceError(
            f"{filename} defines no top-level class {class_name} "
            f"(it defines: {', '.join(sorted(classes)) or 'none'})"
        )
    return _spec(classes[class_name])


def resolve_class(source: str, class_name: str, filename: str = "<source>") -> ClassSpec:
    """``class_name`` with the methods it inherits from classes of the same module.

    Bases defined elsewhere (vLLM's own base, ``ABC``) contribute nothing: the
    check is that the module itself implements what the base class requires.
    Lookup follows Python's order for single and simple multiple inheritance
    (depth-first, left to right, first definition wins).
    """
    classes = _class_nodes(source, filename)
    if class_name not in classes:
        raise ConformanceError(
            f"{filename} defines no top-level class {class_name} "
            f"(it defines: {', '.join(sorted(classes)) or 'none'})"
        )
    top = _spec(classes[class_name])
    merged = ClassSpec(name=top.name, bases=top.bases, lineno=top.lineno)
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name not in classes:
            return
        seen.add(name)
        spec = _spec(classes[name])
        for method_name, sig in spec.methods.items():
            merged.methods.setdefault(method_name, sig)
        for base in spec.bases:
            visit(base)

    visit(class_name)
    return merged


def load_base(path: str | os.PathLike[str], class_name: str = BASE_CLASS) -> ClassSpec:
    """``class_name`` (default ``KVConnectorBase_V1``) from vLLM's ``base.py`` or its wheel."""
    return parse_class(read_source(path, BASE_MEMBER), class_name, filename=str(path))


# ---------------------------------------------------------------- comparing


def _param_problems(base: MethodSig, impl: MethodSig, annotations: bool) -> list[str]:
    found: list[str] = []
    for index in range(max(len(base.params), len(impl.params))):
        b = base.params[index] if index < len(base.params) else None
        i = impl.params[index] if index < len(impl.params) else None
        if b is None:
            assert i is not None
            found.append(f"parameter {index} '{i.render(annotations)}' is not in the base")
            continue
        if i is None:
            found.append(f"parameter {index} '{b.render(annotations)}' is missing")
            continue
        if b.name != i.name:
            found.append(f"parameter {index} is named '{i.name}', the base names it '{b.name}'")
        if b.kind != i.kind:
            found.append(f"parameter '{b.name}' is {i.kind}, the base has it {b.kind}")
        if b.default != i.default:
            found.append(
                f"parameter '{b.name}' defaults to {i.default or 'nothing'}, "
                f"the base to {b.default or 'nothing'}"
            )
        if annotations and b.annotation != i.annotation:
            found.append(
                f"parameter '{b.name}' is annotated {i.annotation or 'nothing'}, "
                f"the base {b.annotation or 'nothing'}"
            )
    if annotations and base.returns != impl.returns:
        found.append(f"returns {impl.returns or 'nothing'}, the base {base.returns or 'nothing'}")
    return found


def compare_method(base: MethodSig, impl: MethodSig, annotations: bool = True) -> list[Problem]:
    """How ``impl`` departs from ``base`` (empty when they match)."""
    if base.kind != impl.kind:
        return [
            Problem(
                "kind_mismatch",
                base.name,
                f"is a {impl.kind} (line {impl.lineno}), the base defines a {base.kind} "
                f"(line {base.lineno})",
            )
        ]
    problems: list[Problem] = []
    if base.is_async != impl.is_async:
        problems.append(
            Problem(
                "kind_mismatch",
                base.name,
                f"is {'async' if impl.is_async else 'not async'}, the base's is "
                f"{'async' if base.is_async else 'not async'}",
            )
        )
    details = _param_problems(base, impl, annotations)
    if details:
        problems.append(
            Problem(
                "signature_mismatch",
                base.name,
                f"line {impl.lineno}: {'; '.join(details)}. The base (line {base.lineno}) "
                f"has: {base.render(annotations)}",
            )
        )
    return problems


def check_spec(base: ClassSpec, impl: ClassSpec, annotations: bool = True) -> ConformanceReport:
    """Every abstract method of ``base`` implemented by ``impl``, and every method
    ``impl`` shares with ``base`` of the same kind and signature."""
    problems: list[Problem] = []
    checked: list[str] = []
    for name, base_sig in base.methods.items():
        impl_sig = impl.methods.get(name)
        if impl_sig is None:
            if base_sig.abstract:
                problems.append(
                    Problem(
                        "missing_abstract",
                        name,
                        f"abstract in {base.name} (line {base_sig.lineno}) and not "
                        f"implemented; the base has: {base_sig.render(annotations)}",
                    )
                )
            continue
        checked.append(name)
        problems.extend(compare_method(base_sig, impl_sig, annotations))
    return ConformanceReport(base=base.name, impl=impl.name, checked=checked, problems=problems)


def check_class(
    base: ClassSpec,
    impl_source: str,
    impl_class: str,
    *,
    filename: str = "<source>",
    annotations: bool = True,
) -> ConformanceReport:
    """Check class ``impl_class`` of module source ``impl_source`` against ``base``
    (see ``check_spec``); methods it inherits from classes of the same module count."""
    return check_spec(base, resolve_class(impl_source, impl_class, filename), annotations)


def check_file(
    base: ClassSpec,
    impl_path: str | os.PathLike[str],
    impl_class: str,
    *,
    annotations: bool = True,
) -> ConformanceReport:
    """``check_class`` on a ``.py`` file."""
    path = Path(impl_path)
    return check_class(
        base, path.read_text(encoding="utf-8"), impl_class, filename=str(path), annotations=annotations
    )


def same_signatures(a: ClassSpec, b: ClassSpec) -> list[str]:
    """Where two classes' method lists differ (empty when equal), annotations included.

    Used to prove a stand-in base class equal to the pinned wheel's: the same
    methods, each of the same kind, abstractness and exact signature.
    """
    found: list[str] = []
    for name in a.methods.keys() - b.methods.keys():
        found.append(f"{name}: only in {a.name}")
    for name in b.methods.keys() - a.methods.keys():
        found.append(f"{name}: only in {b.name}")
    for name in a.methods.keys() & b.methods.keys():
        sa, sb = a.methods[name], b.methods[name]
        if sa.abstract != sb.abstract:
            found.append(f"{name}: abstract in one, not the other")
        found += [f"{name}: {p.message}" for p in compare_method(sa, sb, annotations=True)]
    return sorted(found)


# ---------------------------------------------------------------- the factory's contract


def factory_constructor_arity(factory_source: str, filename: str = FACTORY_MEMBER) -> int:
    """How many positional arguments ``KVConnectorFactory.create_connector`` passes
    to the connector class (``connector_cls(config, role, kv_cache_config)``: 3)."""
    classes = _class_nodes(factory_source, filename)
    factory = classes.get("KVConnectorFactory")
    if factory is None:
        raise ConformanceError(f"{filename} defines no KVConnectorFactory")
    for item in factory.body:
        if isinstance(item, ast.FunctionDef) and item.name == "create_connector":
            for node in ast.walk(item):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Name)
                    and node.func.id == "connector_cls"
                ):
                    if node.keywords:
                        raise ConformanceError(
                            f"{filename}:{node.lineno}: the connector is constructed with "
                            "keyword arguments; update this check"
                        )
                    return len(node.args)
            raise ConformanceError(f"{filename}: create_connector never calls connector_cls(...)")
    raise ConformanceError(f"{filename}: KVConnectorFactory has no create_connector")


def accepts_positional(sig: MethodSig, count: int) -> bool:
    """Whether a method accepts ``count`` positional arguments after self/cls."""
    positional = [p for p in sig.params if p.kind in (POSITIONAL_ONLY, POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is None]
    has_var = any(p.kind == VAR_POSITIONAL for p in sig.params)
    bound = 1 if sig.kind in (METHOD, CLASSMETHOD, PROPERTY) else 0
    required_kwonly = [p for p in sig.params if p.kind == KEYWORD_ONLY and p.default is None]
    if required_kwonly:
        return False
    return len(required) - bound <= count and (has_var or len(positional) - bound >= count)


def main(argv: list[str] | None = None) -> int:
    """``python -m kvrail_vllm.conformance [--no-annotations] BASE_OR_WHEEL MODULE.py CLASS``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m kvrail_vllm.conformance",
        description=f"Check a KV connector class against vLLM's {BASE_CLASS}, by parsing.",
    )
    parser.add_argument("base", help="vLLM's base.py, or the vLLM wheel")
    parser.add_argument("module", help="the .py file defining the connector")
    parser.add_argument("cls", help="the connector class name")
    parser.add_argument("--base-class", default=BASE_CLASS)
    parser.add_argument("--no-annotations", action="store_true", help="compare names, kinds, defaults only")
    args = parser.parse_args(argv)
    try:
        base = load_base(args.base, args.base_class)
        report = check_file(base, args.module, args.cls, annotations=not args.no_annotations)
    except ConformanceError as err:
        print(f"error: {err}")
        return 2
    print(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
