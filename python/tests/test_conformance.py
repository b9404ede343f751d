"""Tests of kvrail_vllm.conformance: on a synthetic base class written here (always
run), and on the pinned vLLM wheel's real base.py (skipped only if the wheel is
not on disk)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from kvrail_vllm import conformance as c

SYNTHETIC_BASE = textwrap.dedent(
    '''
    from abc import ABC, abstractmethod
    from typing import TYPE_CHECKING, Any, Literal

    if TYPE_CHECKING:
        from somewhere import Request


    class Other:
        def not_the_base(self): ...


    class KVConnectorBase_V1(ABC):
        def __init__(self, vllm_config: "VllmConfig", role: int, kv_cache_config: "KVCacheConfig"):
            self._role = role

        @property
        def role(self) -> int:
            return self._role

        @classmethod
        def layout(cls, vllm_config: "VllmConfig") -> str | None:
            return None

        @abstractmethod
        def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
            pass

        @abstractmethod
        def get_num_new_matched_tokens(
            self, request: "Request", num_computed_tokens: int
        ) -> tuple[int | None, bool]:
            pass

        def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
            return None, None

        def poll(self, timeout: float = 0.5, *, direction: Literal["h2d", "d2h"] = "h2d") -> list["Request"]:
            return []
    '''
)

GOOD_IMPL = textwrap.dedent(
    '''
    from typing import Any, Literal
    from base import KVConnectorBase_V1


    class Scheduling(KVConnectorBase_V1):
        def get_num_new_matched_tokens(
            self, request: Request, num_computed_tokens: int
        ) -> tuple[int | None, bool]:
            return 0, False


    class Good(Scheduling):
        def __init__(self, vllm_config: VllmConfig, role: int, kv_cache_config: KVCacheConfig):
            super().__init__(vllm_config, role, kv_cache_config)

        @classmethod
        def layout(cls, vllm_config: VllmConfig) -> str | None:
            return "LBHNC"

        def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
            pass

        def poll(self, timeout: float = 0.5, *, direction: Literal['h2d', 'd2h'] = 'h2d') -> list[Request]:
            return []

        def _private_helper(self, anything, at_all=3):
            return anything
    '''
)


@pytest.fixture
def base_path(tmp_path: Path) -> Path:
    path = tmp_path / "base.py"
    path.write_text(SYNTHETIC_BASE)
    return path


@pytest.fixture
def base(base_path: Path) -> c.ClassSpec:
    return c.load_base(base_path)


def replace_once(source: str, old: str, new: str) -> str:
    assert source.count(old) == 1, f"test fixture: {old!r} must occur once"
    return source.replace(old, new)


# ---------------------------------------------------------------- synthetic base


def test_parses_abstract_methods_and_signatures(base: c.ClassSpec) -> None:
    assert base.name == "KVConnectorBase_V1"
    assert base.abstract_methods == ["start_load_kv", "get_num_new_matched_tokens"]
    assert list(base.methods) == [
        "__init__",
        "role",
        "layout",
        "start_load_kv",
        "get_num_new_matched_tokens",
        "get_finished",
        "poll",
    ]
    assert base.methods["role"].kind == c.PROPERTY
    assert base.methods["layout"].kind == c.CLASSMETHOD
    assert base.methods["poll"].params == (
        c.Param("self", c.POSITIONAL_OR_KEYWORD),
        c.Param("timeout", c.POSITIONAL_OR_KEYWORD, "0.5", "float"),
        c.Param("direction", c.KEYWORD_ONLY, "'h2d'", "Literal['h2d', 'd2h']"),
    )
    load = base.methods["start_load_kv"]
    assert load.params[-1] == c.Param("kwargs", c.VAR_KEYWORD, None, "Any")
    assert load.returns == "None"
    # The forward reference "ForwardContext" reads as the name it quotes.
    assert load.params[1].annotation == "ForwardContext"
    assert load.render() == "def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None"
    assert base.methods["poll"].render(with_annotations=False) == "def poll(self, timeout=0.5, *, direction='h2d')"


def test_conforming_class_passes(base: c.ClassSpec) -> None:
    report = c.check_class(base, GOOD_IMPL, "Good")
    assert report.ok, str(report)
    # Inherited from a class of the same module, so checked too.
    assert "get_num_new_matched_tokens" in report.checked
    assert set(report.checked) == {"__init__", "layout", "start_load_kv", "get_num_new_matched_tokens", "poll"}


def test_missing_abstract_method_is_caught(base: c.ClassSpec) -> None:
    # Good without its in-module parent loses get_num_new_matched_tokens.
    source = replace_once(GOOD_IMPL, "class Good(Scheduling):", "class Good(KVConnectorBase_V1):")
    report = c.check_class(base, source, "Good")
    assert not report.ok
    assert [(p.kind, p.method) for p in report.problems] == [
        ("missing_abstract", "get_num_new_matched_tokens")
    ]
    assert "num_computed_tokens: int" in report.problems[0].message


def test_renamed_parameter_is_caught(base: c.ClassSpec) -> None:
    source = replace_once(GOOD_IMPL, "self, request: Request, num_computed_tokens: int", "self, request: Request, num_tokens: int")
    report = c.check_class(base, source, "Good")
    assert [(p.kind, p.method) for p in report.problems] == [
        ("signature_mismatch", "get_num_new_matched_tokens")
    ]
    assert "named 'num_tokens'" in report.problems[0].message


def test_changed_default_kind_and_arity_are_caught(base: c.ClassSpec) -> None:
    poll = "timeout: float = 0.5, *, direction"
    cases = [
        ("timeout: float = 1.0, *, direction", "defaults to 1.0, the base to 0.5"),
        ("timeout: float = 0.5, direction", "is positional_or_keyword, the base has it keyword_only"),
        ("timeout: float = 0.5, extra: int = 0, *, direction", "parameter 2 is named 'extra'"),
        ("timeout: float, *, direction", "defaults to nothing, the base to 0.5"),
    ]
    for replacement, expected in cases:
        source = replace_once(GOOD_IMPL, poll, replacement)
        report = c.check_class(base, source, "Good")
        assert [p.method for p in report.problems] == ["poll"], (replacement, str(report))
        assert expected in report.problems[0].message, (replacement, report.problems[0].message)
    # A dropped **kwargs is a missing parameter.
    source = replace_once(GOOD_IMPL, "forward_context: ForwardContext, **kwargs: Any", "forward_context: ForwardContext")
    report = c.check_class(base, source, "Good")
    assert [p.method for p in report.problems] == ["start_load_kv"]
    assert "'**kwargs: Any' is missing" in report.problems[0].message


def test_annotation_mismatch_only_when_annotations_are_compared(base: c.ClassSpec) -> None:
    source = replace_once(GOOD_IMPL, "-> str | None:\n        return \"LBHNC\"", "-> str:\n        return \"LBHNC\"")
    strict = c.check_class(base, source, "Good")
    assert [(p.kind, p.method) for p in strict.problems] == [("signature_mismatch", "layout")]
    assert "returns str, the base str | None" in strict.problems[0].message
    assert c.check_class(base, source, "Good", annotations=False).ok


def test_method_kind_mismatch_is_caught(base: c.ClassSpec) -> None:
    source = replace_once(GOOD_IMPL, "    @classmethod\n    def layout(cls,", "    def layout(cls,")
    report = c.check_class(base, source, "Good")
    assert [(p.kind, p.method) for p in report.problems] == [("kind_mismatch", "layout")]
    assert "is a method" in report.problems[0].message and "classmethod" in report.problems[0].message


def test_reads_base_from_a_wheel(tmp_path: Path) -> None:
    wheel = tmp_path / "vllm-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(c.BASE_MEMBER, SYNTHETIC_BASE)
    assert c.load_base(wheel).abstract_methods == ["start_load_kv", "get_num_new_matched_tokens"]
    empty = tmp_path / "other.whl"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("something_else.py", "")
    with pytest.raises(c.ConformanceError, match="has no member"):
        c.load_base(empty)


def test_unknown_class_and_missing_file_are_clear_errors(base_path: Path, tmp_path: Path) -> None:
    with pytest.raises(c.ConformanceError, match="defines no top-level class Nope .*KVConnectorBase_V1"):
        c.load_base(base_path, "Nope")
    with pytest.raises(c.ConformanceError, match="does not exist"):
        c.load_base(tmp_path / "absent.py")


def test_same_signatures(base: c.ClassSpec) -> None:
    assert c.same_signatures(base, base) == []
    changed = c.parse_class(SYNTHETIC_BASE.replace("num_computed_tokens: int", "num_computed_tokens: float"))
    diff = c.same_signatures(base, changed)
    assert len(diff) == 1 and diff[0].startswith("get_num_new_matched_tokens:")
    fewer = c.parse_class(SYNTHETIC_BASE.replace("def get_finished(", "def get_done("))
    # Both classes are named KVConnectorBase_V1; the message says which side has it.
    assert c.same_signatures(base, fewer) == [
        "get_done: only in KVConnectorBase_V1",
        "get_finished: only in KVConnectorBase_V1",
    ]


def test_factory_arity_and_constructor_contract(base: c.ClassSpec) -> None:
    factory = textwrap.dedent(
        '''
        class KVConnectorFactory:
            @classmethod
            def create_connector(cls, config, role, kv_cache_config):
                connector_cls = cls.get_connector_class(config)
                return connector_cls(config, role, kv_cache_config)
        '''
    )
    assert c.factory_constructor_arity(factory) == 3
    init = base.methods["__init__"]
    assert c.accepts_positional(init, 3)
    assert not c.accepts_positional(init, 2)
    two_arg = c.parse_class("class K:\n    def __init__(self, vllm_config, role): ...\n", "K")
    assert not c.accepts_positional(two_arg.methods["__init__"], 3)


def test_import_has_no_side_effects() -> None:
    code = (
        "import sys, kvrail_vllm, kvrail_vllm.conformance;"
        "print(sorted(m for m in ('torch', 'vllm', 'grpc', 'socket', 'zmq') if m in sys.modules))"
    )
    package_parent = str(Path(c.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": package_parent}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_command_line(base_path: Path, tmp_path: Path) -> None:
    module = tmp_path / "impl.py"
    module.write_text(GOOD_IMPL)
    assert c.main([str(base_path), str(module), "Good"]) == 0
    module.write_text(replace_once(GOOD_IMPL, "class Good(Scheduling):", "class Good(KVConnectorBase_V1):"))
    assert c.main([str(base_path), str(module), "Good"]) == 1
    assert c.main([str(base_path), str(module), "Missing"]) == 2


# ---------------------------------------------------------------- the pinned wheel

WHEEL = c.find_pinned_wheel()
needs_wheel = pytest.mark.skipif(
    WHEEL is None,
    reason=(
        f"vLLM {c.PINNED_VLLM_VERSION} wheel not found in ~/.cache/kvrail/wheels "
        f"(or ${c.WHEEL_ENV} / ${c.WHEEL_DIR_ENV}); get it with: pip download --no-deps "
        f"vllm=={c.PINNED_VLLM_VERSION} -d ~/.cache/kvrail/wheels"
    ),
)

NIXL_CONNECTOR = "vllm/distributed/kv_transfer/kv_connector/v1/nixl/connector.py"


def stub_class(spec: c.ClassSpec, name: str, methods: list[str]) -> str:
    """Source of a class that defines ``methods`` with the base's exact signatures."""
    decorator = {c.CLASSMETHOD: "@classmethod", c.STATICMETHOD: "@staticmethod", c.PROPERTY: "@property"}
    lines = [f"class {name}(KVConnectorBase_V1):"]
    for method in methods:
        sig = spec.methods[method]
        if sig.kind in decorator:
            lines.append(f"    {decorator[sig.kind]}")
        lines.append(f"    {sig.render()}:")
        lines.append("        raise NotImplementedError")
    return "\n".join(lines) + "\n"


@needs_wheel
def test_real_base_abstract_methods_and_constructor() -> None:
    base = c.load_base(WHEEL)
    assert set(base.abstract_methods) == {
        "get_num_new_matched_tokens",
        "update_state_after_alloc",
        "build_connector_meta",
        "start_load_kv",
        "wait_for_layer_load",
        "save_kv_layer",
        "wait_for_save",
    }
    init = base.methods["__init__"]
    assert [p.name for p in init.params] == ["self", "vllm_config", "role", "kv_cache_config"]
    arity = c.factory_constructor_arity(c.read_source(WHEEL, c.FACTORY_MEMBER))
    assert c.accepts_positional(init, arity)
    hma = c.load_base(WHEEL, c.HMA_CLASS)
    assert hma.abstract_methods == ["request_finished_all_groups"]


@needs_wheel
def test_real_nixl_connectors_conform() -> None:
    """No false alarms: vLLM's own NixlConnector passes (names, kinds, defaults;
    its annotations legitimately narrow the base's, so they are not compared)."""
    base = c.load_base(WHEEL)
    source = c.read_source(WHEEL, NIXL_CONNECTOR)
    for cls in ("NixlPullConnector", "NixlPushConnector"):
        report = c.check_class(base, source, cls, filename=NIXL_CONNECTOR, annotations=False)
        assert report.ok, str(report)
        assert set(base.abstract_methods) <= set(report.checked)


@needs_wheel
def test_real_base_catches_missing_and_mismatched_methods() -> None:
    base = c.load_base(WHEEL)
    every = list(base.methods)
    # Every signature rendered back from the parse conforms, annotations included.
    full = stub_class(base, "Stub", every)
    report = c.check_class(base, full, "Stub")
    assert report.ok, str(report)
    assert report.checked == every

    missing = stub_class(base, "Stub", [m for m in every if m != "build_connector_meta"])
    report = c.check_class(base, missing, "Stub")
    assert [(p.kind, p.method) for p in report.problems] == [("missing_abstract", "build_connector_meta")]

    mismatched = replace_once(
        full,
        "def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int)",
        "def get_num_new_matched_tokens(self, request: Request, num_tokens: int)",
    )
    report = c.check_class(base, mismatched, "Stub")
    assert [(p.kind, p.method) for p in report.problems] == [
        ("signature_mismatch", "get_num_new_matched_tokens")
    ]

    wrong_kind = replace_once(
        full,
        "    @classmethod\n    def get_required_kvcache_layout(",
        "    def get_required_kvcache_layout(",
    )
    report = c.check_class(base, wrong_kind, "Stub")
    assert [(p.kind, p.method) for p in report.problems] == [("kind_mismatch", "get_required_kvcache_layout")]


@needs_wheel
def test_kvrail_connector_conforms_to_the_pinned_base_and_hma() -> None:
    """KvrailConnector against the wheel's own KVConnectorBase_V1 and SupportsHMA:
    every abstract method, and every override with the base's names, kinds,
    defaults and annotations."""
    source = (Path(__file__).resolve().parents[1] / "kvrail_vllm" / "connector.py").read_text()
    for cls_name in (c.BASE_CLASS, c.HMA_CLASS):
        base = c.load_base(WHEEL, cls_name)
        report = c.check_class(base, source, "KvrailConnector", filename="connector.py")
        assert report.ok, str(report)
        assert set(base.abstract_methods) <= set(report.checked), cls_name
