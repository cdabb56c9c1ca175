"""The public API is one documented surface: every name in the public modules' ``__all__`` exists and is
documented (functions, classes and the public methods of the package's own classes), ``relaxeq_fast``
exports the functional ops, layers, model helpers and schedules, ``combine_regularizers`` drops no term
silently, and the console scripts' --help gives every option a meaning and its default exactly once."""
import argparse
import importlib
import inspect
import re
from pathlib import Path

import pytest

import relaxeq_fast
from relaxeq_fast.train import cli
from relaxeq_fast.train.config import DATASET_SETUPS, MODELS, TrainConfig

PUBLIC_MODULES = ["relaxeq_fast", "relaxeq_fast.vn", "relaxeq_fast.nn", "relaxeq_fast.models",
                  "relaxeq_fast.relaxation", "relaxeq_fast.regularizer", "relaxeq_fast.functional",
                  "relaxeq_fast.steerable", "relaxeq_fast.interop", "relaxeq_fast.data.smoke"]

# issue 15: what `from relaxeq_fast import ...` must offer, and where each name lives
TOP_LEVEL = {
    "relaxeq_fast.functional": ["relaxed_linear", "relaxed_params", "vn_leaky_relu", "vn_batch_norm",
                                "relaxed_conv2d", "InputStats"],
    "relaxeq_fast.nn": ["EquivariantLinear", "RelaxedLinear"],
    "relaxeq_fast.vn": ["relax", "project", "swap", "set_theta", "model_regularizers", "equivariance_error",
                        "relaxed_layers"],
    "relaxeq_fast.relaxation": ["ThetaScheduler", "make_schedule", "projection_error", "SCHEDULES", "ThetaSchedule",
                                "Triangle", "HoldThenLinearDecay", "Constant", "Cosine"],
    "relaxeq_fast.regularizer": ["combine_regularizers", "relaxation_regularizers", "lie_derivative_matrices"],
}
# exported before issue 15: kept
PREVIOUS_EXPORTS = ["BACKENDS", "InputStats", "equivariance_error", "project", "relax", "swap", "Irreps", "VN",
                    "build_info", "combine_regularizers", "get_backend", "lie_derivative_matrices", "models", "nn",
                    "relaxation", "vn", "random_rotation", "relaxation_regularizers", "relaxed_linear",
                    "relaxed_linear_backward_ref", "relaxed_linear_ref", "resolve_backend", "use_backend"]


def _public_objects():
    """(qualified name, object) of every function and class reachable from the public ``__all__`` lists."""
    seen, out = set(), []
    for mod_name in PUBLIC_MODULES:
        mod = importlib.import_module(mod_name)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if (inspect.isclass(obj) or inspect.isroutine(obj)) and id(obj) not in seen:
                seen.add(id(obj))
                out.append((f"{mod_name}.{name}", obj))
    return out


def _public_methods(cls):
    """(name, function) of the public methods and properties ``cls`` itself defines."""
    for name, attr in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(attr, (staticmethod, classmethod)):
            yield name, attr.__func__
        elif isinstance(attr, property):
            yield name, attr.fget
        elif inspect.isfunction(attr):
            yield name, attr


@pytest.mark.parametrize("mod_name", PUBLIC_MODULES)
def test_all_names_exist(mod_name):
    mod = importlib.import_module(mod_name)
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing, f"{mod_name}.__all__ names what the module lacks: {missing}"
    assert len(set(mod.__all__)) == len(mod.__all__), f"{mod_name}.__all__ has duplicates"


def test_every_public_function_class_and_method_is_documented():
    undocumented = []
    for qualname, obj in _public_objects():
        doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
        if not (doc and doc.strip()):
            undocumented.append(qualname)
        if inspect.isclass(obj) and obj.__module__.startswith("relaxeq_fast"):
            undocumented += [f"{qualname}.{name}" for name, fn in _public_methods(obj)
                             if not (fn.__doc__ and fn.__doc__.strip())]
    assert not undocumented, f"public API without a docstring: {undocumented}"


def test_top_level_exports():
    for mod_name, names in TOP_LEVEL.items():
        mod = importlib.import_module(mod_name)
        for name in names:
            assert name in relaxeq_fast.__all__, name
            assert getattr(relaxeq_fast, name) is getattr(mod, name), f"relaxeq_fast.{name} is not {mod_name}.{name}"
    for name in PREVIOUS_EXPORTS:
        assert name in relaxeq_fast.__all__, name
    # the submodules stay reachable as attributes (relaxeq_fast.nn is the module, not a layer)
    assert inspect.ismodule(relaxeq_fast.nn) and relaxeq_fast.nn.RelaxedLinear is relaxeq_fast.RelaxedLinear
    assert relaxeq_fast.relaxed_linear is relaxeq_fast.functional.relaxed_linear
    ns = {}
    exec("from relaxeq_fast import *", ns)
    assert set(relaxeq_fast.__all__) <= set(ns)


def test_combine_regularizers_has_no_silent_lambda_default():
    import torch
    from relaxeq_fast import RegularizerTerms, combine_regularizers
    params = inspect.signature(combine_regularizers).parameters
    for name in ("lambda_ld", "lambda_n"):
        assert params[name].default is inspect.Parameter.empty, f"{name} has a default"
    t = RegularizerTerms(torch.tensor(4.0), torch.tensor(9.0), 1)
    with pytest.raises(TypeError):
        combine_regularizers([t])
    with pytest.raises(TypeError):
        combine_regularizers([t], 1.0)
    assert combine_regularizers([t], 1.0, 1.0).item() == pytest.approx(2.0 + 3.0)  # R_N counts


# ---- --help ------------------------------------------------------------------------------------------------


def _help_entries(text):
    """{invocation: help text} of an argparse --help rendered without wrapping."""
    entries, current = {}, None
    for line in text.splitlines():
        if re.match(r"^  \S", line):  # an option or positional: '  --lr LR    help' or '  --data-root DATA_ROOT'
            invocation, _, rest = line.strip().partition("  ")
            current = invocation
            assert current not in entries, f"{current} listed twice"
            entries[current] = rest.strip()
        elif line.startswith("   ") and current is not None:  # help on the next line(s)
            entries[current] = (entries[current] + " " + line.strip()).strip()
        else:
            current = None
    return entries


def _render_help(monkeypatch, capsys, main):
    monkeypatch.setenv("COLUMNS", "100000")  # one line per help text
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code in (0, None)
    return _help_entries(capsys.readouterr().out)


def _check_help(entries, parser_actions, exempt_default=()):
    """Every option listed once with non-empty help and its default stated once; returns {dest: stated default}."""
    stated = {}
    for action in parser_actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flags = action.option_strings or [action.dest]
        matches = [inv for inv in entries if set(flags) <= set(re.findall(r"--?[\w-]+|^\w+$", inv))]
        assert len(matches) == 1, f"{flags}: listed {len(matches)} times in --help"
        help_text = entries[matches[0]]
        assert help_text and not help_text.startswith("(default"), f"{flags}: no help text"
        assert "(default: None)" not in help_text, f"{flags}: {help_text}"
        n = help_text.count("(default:")
        if action.required or not action.option_strings or action.dest in exempt_default:
            assert n <= 1, f"{flags}: default shown {n} times: {help_text}"
            continue
        assert n == 1, f"{flags}: default shown {n} times: {help_text}"
        m = re.search(r"\(default: (.*)\)$", help_text)
        assert m, f"{flags}: the default must end the help: {help_text}"
        stated[action.dest] = m.group(1)
    return stated


def _same(text: str, value) -> bool:
    if isinstance(value, bool):
        return text == ("on" if value else "off")
    if isinstance(value, (int, float)):
        try:
            return float(text) == float(value)
        except ValueError:
            return False
    return text == str(value)


def _paper_values(text: str) -> tuple[dict, dict]:
    """'the model's paper setup: m1/m2 v, m3 w; with --dataset d: x' → ({model: 'v', ...}, {dataset: 'x'})."""
    body = text[len("the model's paper setup: "):]
    main, *datasets = body.split("; with --dataset ")
    per_model = {}
    if main.endswith(" for every model"):
        per_model = {m: main[:-len(" for every model")] for m in MODELS}
    else:
        for item in main.split(", "):
            models, _, value = item.partition(" ")
            per_model.update({m: value for m in models.split("/")})
    per_dataset = dict(d.split(": ", 1) for d in datasets)
    return per_model, per_dataset


def test_train_help_states_every_default_once(monkeypatch, capsys):
    parser = cli._parser()
    entries = _render_help(monkeypatch, capsys, cli.main)
    stated = _check_help(entries, parser._actions)
    assert {"epochs", "lr", "weight_decay", "theta_max", "seed"} <= set(stated)
    no_dataset_setup = next(d for d in ("modelnet40", "rotmnist", "nbody") if d not in DATASET_SETUPS)
    for action in parser._actions:
        text = stated.get(action.dest)
        if text is None:
            continue
        if text.startswith("the model's paper setup: "):
            assert action.default is None, action.dest
            per_model, per_dataset = _paper_values(text)
            assert set(per_model) == set(MODELS), (action.dest, text)
            for model, value in per_model.items():
                want = getattr(TrainConfig(model=model, dataset=no_dataset_setup).resolved(), action.dest)
                assert _same(value, want), f"--{action.dest}: {model} {value} in --help, {want!r} resolved"
            for dataset, value in per_dataset.items():
                for model in MODELS:
                    want = getattr(TrainConfig(model=model, dataset=dataset).resolved(), action.dest)
                    assert _same(value, want), f"--{action.dest}: --dataset {dataset} {value}, {want!r} resolved"
        elif action.default is None:
            assert text and text != "None", action.dest  # a description of what unset means
        elif isinstance(action, argparse._StoreTrueAction):
            assert text == "off", action.dest
        else:
            assert _same(text, action.default), f"--{action.dest}: {text} in --help, {action.default!r} in the parser"
    # every TrainConfig field that a paper setup fills says so
    for action in parser._actions:
        if action.dest in stated and action.default is None and getattr(TrainConfig(), action.dest, 0) is None \
                and getattr(TrainConfig().resolved(), action.dest) is not None:
            assert stated[action.dest].startswith("the model's paper setup: "), action.dest


def test_study_help_states_every_default_once(monkeypatch, capsys):
    from relaxeq_fast import study
    parser = study.cli._parser()
    entries = _render_help(monkeypatch, capsys, lambda argv: parser.parse_args(argv))
    stated = _check_help(entries, parser._actions)
    for action in parser._actions:
        text = stated.get(action.dest)
        if text is not None and action.default not in (None, False, []):
            assert _same(text, action.default), f"--{action.dest}: {text} in --help, {action.default!r} in the parser"


def test_bench_help_states_every_default_once(monkeypatch, capsys):
    from relaxeq_fast import bench
    entries = _render_help(monkeypatch, capsys, bench.main)
    options = [inv for inv in entries if inv.startswith("--")]
    assert len(options) >= 6
    for inv in options:
        help_text = entries[inv]
        assert help_text, f"{inv}: no help text"
        assert "(default: None)" not in help_text, inv
        assert help_text.count("(default:") == 1, f"{inv}: {help_text}"


def test_every_ops_name_the_code_uses_is_reexported():
    """relaxeq_fast._ops re-exports its op modules' ``__all__``: a name the code reads as ``_ops.<name>`` but no
    module exports fails only on the path that reads it (the Triton registrations run on first use), so every
    such read in the package, the Triton kernels, the tests, benchmarks and scripts is checked here."""
    from relaxeq_fast import _ops
    root = Path(__file__).resolve().parents[1]
    used = set()
    for folder in ("relaxeq_fast", "triton_kernels", "tests", "benchmarks", "scripts"):
        for path in (root / folder).rglob("*.py"):
            used |= set(re.findall(r"\b_ops\.([A-Za-z]\w*)", path.read_text()))
    assert len(used) > 20, f"the scan found too few _ops reads to mean anything: {sorted(used)}"
    missing = sorted(n for n in used if not hasattr(_ops, n))
    assert not missing, f"read as relaxeq_fast._ops.<name> but not there: {missing}"
    assert len(set(_ops.__all__)) == len(_ops.__all__), "relaxeq_fast._ops.__all__ has duplicates"
    not_in_all = sorted(n for n in used if n not in _ops.__all__ and not inspect.ismodule(getattr(_ops, n)))
    assert not not_in_all, f"read as relaxeq_fast._ops.<name> but not in its __all__: {not_in_all}"


def test_op_registration_pairs_a_backward_op_with_its_fake():
    from relaxeq_fast._ops import AUTOCAST_FP32, register_op_formulas
    with pytest.raises(ValueError, match="relaxeq::nothing: backward_qualname and backward_fake go together"):
        register_op_formulas("relaxeq::nothing", fake=None, backward=None, setup_context=None,
                             autocast=AUTOCAST_FP32, backward_qualname="relaxeq::nothing_backward")
