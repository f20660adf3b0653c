"""The repository's shape: the paper's core at the top level and everything else in a folder per
concern, imports that flow from the folders to the core and never back (lazy imports included),
no import cycle, nothing importing the command line, one home for every setting and shared piece,
every file that code, tests and documents cite present, and the README's Layout tables matching
the tree."""

import ast
import inspect
import re
from pathlib import Path

import decoder
import model
import ppo
import presets
import sft
from experiments import table1
from model import FeedForward

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
CORE = {p.stem: p for p in ROOT.glob("*.py")}
MODULES = {
    **CORE,
    **{f"{p.parent.name}.{p.stem}": p for f in FOLDERS for p in (ROOT / f).glob("*.py")},
}
ENTRY = "cagsr"  # the command line: it dispatches to every stage and experiment; nothing imports it


def imports(path: Path) -> set[str]:
    """The project modules `path` imports, lazy imports (inside functions) included: `import x`,
    `from x import y` (y a module of the folder x, or a name in module x), `from x.y import z`."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    me = next(m for m, p in MODULES.items() if p == path)
    return {m for m in out if m in MODULES and m != me}


GRAPH = {m: imports(p) for m, p in MODULES.items()}


def in_folder(module: str) -> bool:
    return "." in module


def test_the_core_is_at_the_top_level_in_at_most_12_files():
    assert {"cagsr", "model", "ppo", "data", "reward"} <= set(CORE)
    assert len(CORE) <= 12, sorted(CORE)
    assert set(FOLDERS) == {"bench", "cli", "experiments", "interop"}


def test_no_core_module_imports_a_folder():
    """Folders import the core, never the reverse: a reader of the paper opens nothing outside the
    top level. The entry point alone reaches the folders, to dispatch to them."""
    reach = {m: sorted(n for n in GRAPH[m] if in_folder(n)) for m in CORE if m != ENTRY}
    assert {m: r for m, r in reach.items() if r} == {}
    assert any(in_folder(n) for n in GRAPH[ENTRY])  # the graph was read


def test_nothing_imports_the_command_line():
    assert sorted(m for m, deps in GRAPH.items() if ENTRY in deps) == []
    notebook = (ROOT / "tutorial.ipynb").read_text()
    assert not re.search(r"(from|import) cagsr\b", notebook)


def test_the_import_graph_has_no_cycle():
    done, on_path = set(), []

    def visit(m):
        assert m not in on_path, "import cycle: " + " -> ".join(on_path[on_path.index(m) :] + [m])
        if m in done:
            return
        on_path.append(m)
        for n in sorted(GRAPH[m]):
            visit(n)
        on_path.pop()
        done.add(m)

    for m in sorted(GRAPH):
        visit(m)
    assert "parallel" in GRAPH["ppo"] and "sft" in GRAPH["cli.stages"]  # the graph was read


def test_the_library_never_imports_a_benchmark_and_no_runner_imports_another():
    library = [m for m in MODULES if not m.startswith("bench.")]
    assert {m: GRAPH[m] for m in library if any(n.startswith("bench.") for n in GRAPH[m])} == {}
    runners = {"experiments.table1", "experiments.reward_study"}
    for m in runners | {"experiments.common", "cli.settings"}:
        assert GRAPH[m] & runners == set(), m


def top_level_names(path: Path) -> set[str]:
    """The functions, classes and constants `path` defines at module level."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


DEFINED = {m: top_level_names(p) for m, p in MODULES.items()}

# One home per setting: each preset and profile is defined in presets.py and nowhere else, under a
# name of its own. The names on the right once held other settings and are defined nowhere.
SETTING_HOMES = {
    name: {"presets"}
    for name in (
        "SIZES",
        "DECODER_SIZES",
        "SFT_DEFAULTS",
        "SFT_NOISE",
        "EXPERIMENT_SFT_STEPS",
        "RUN_CPU_PPO",
        "EXPERIMENT_CPU_PPO",
        "RL_PROFILES",
        "GPU_SIZES",
        "GPU_SNAPSHOT_PARAMS",
    )
} | {name: set() for name in ("CPU_PPO", "RUN_PROFILE", "RL_PROFILE", "SFT_STEPS", "rl_profile")}

# One home per shared piece: where each is defined, and nowhere else.
PIECE_HOMES = {
    "response_mean": {"reward"},  # the masked per-response mean of §3.2's terms and the rivals
    "DECODER_ONLY_TYPES": {"data"},  # the supported snapshot model types
    "T5_TYPES": {"interop.snapshot"},
    "read_json": {"data"},  # the JSON-read error
    "sft_loss": {"sft"},  # the SFT loss and the validation loss
    "response_nll": {"sft"},
    "mean_nll": {"sft"},
    "NonFiniteError": {"parallel"},  # the non-finite guard of both training loops
    "MAX_BAD": {"parallel"},
    "guarded_step": {"parallel"},
    "progress": {"parallel"},
    "fused": {"parallel"},
    "Policy": {"model"},  # what both policies share
    "SwiGLU": {"decoder"},
    "token_entropy": {"sampling"},
    "Steps": {"sampling"},
    "Rollout": {"sampling"},
    "draw": {"sampling"},
    "check_sampling": {"sampling"},
    "memory_plan": {"cli.plan"},
    "ConfigError": {"checks"},
    "check_fields": {"checks"},
    "checked_overrides": {"checks"},
    "from_pretrained": {"interop.snapshot"},
    "t5_names": {"interop.snapshot"},
    "decoder_names": {"interop.snapshot"},
    "export_checkpoint": {"interop.export"},
    "rl_start": {"cli.runs"},
    "prepare": {"cli.stages"},
    "train_stages": {"cli.stages"},
    "is_qa": {"data"},
    "config_specials": {"data"},
    "check_enough_prompts": {"ppo"},
    "check_split": {"parallel"},
    "build_policy": {"decoder"},
    "policy_config": {"decoder"},
    "prompt_attention": {"decoder"},
    "special_mask": {"model"},
    "shared_setup": {"experiments.common"},
    "seed_sft": {"experiments.common"},
    "seeds_in_workers": {"experiments.common"},
    "rl_temperature": {"bench.common"},
    "linear_flops": {"bench.gpu"},
    "_optional": {"cli.settings"},
    "_optional_flag": set(),
    "Decoding": {"sampling"},  # the bundles the stages receive
    "RLTask": {"ppo"},
    "RLRun": {"ppo"},
    "RLHooks": {"ppo"},
    "SFTTask": {"sft"},
    "SFTRun": {"sft"},
    "SFTHooks": {"sft"},
    "correctness_name": {"experiments.evaluation"},
    "correctness_function": {"experiments.evaluation"},
    "correctness": set(),
    "correctness_of": set(),
    "EXPERIMENT_FLAGS": {"cli.settings"},
}


def test_each_setting_and_shared_piece_has_one_home():
    homes = SETTING_HOMES | PIECE_HOMES
    where = {name: {m for m, names in DEFINED.items() if name in names} for name in homes}
    assert where == homes


def test_presets_is_plain_data_that_imports_nothing_of_the_project():
    assert GRAPH["presets"] == set()
    assert set(presets.RL_PROFILES) == {"run", "table1", "rewards"}
    assert "kl_coef" in presets.RUN_CPU_PPO and "kl_coef" not in presets.EXPERIMENT_CPU_PPO


def test_no_class_borrows_another_class_s_methods():
    """A class body never binds another class's function (`_layer = EncoderDecoder._layer`): what
    two classes share is defined once, in a class both inherit (model.Policy)."""
    borrowed = []
    for m, path in MODULES.items():
        for cls in (
            n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)
        ):
            for node in cls.body:
                if isinstance(node, ast.Assign) and isinstance(node.value, ast.Attribute):
                    value = node.value.value
                    if isinstance(value, ast.Name) and value.id[:1].isupper():
                        borrowed.append(f"{m}.{cls.name}: {ast.unparse(node)}")
    assert borrowed == []
    assert "swiglu" not in inspect.getsource(FeedForward).lower()  # SwiGLU is decoder.py's
    assert not hasattr(model, "token_entropy")  # cited from its home, sampling.py


def test_the_stages_receive_small_bundles_not_long_parameter_lists():
    """The training loops, the rollout and both samplers take config bundles (ppo.RLTask, RLRun,
    RLHooks; sft.SFTTask, SFTRun, SFTHooks; sampling.Decoding), not 10-16 loose parameters; and
    both experiments' run_seed take the shared setup as one bundle."""
    wide = {
        f.__qualname__: len(inspect.signature(f).parameters)
        for f in (
            ppo.train,
            ppo.collect,
            sft.train_sft,
            model.EncoderDecoder.sample,
            decoder.DecoderOnly.sample,
            table1.run_seed,
        )
    }
    assert {name: n for name, n in wide.items() if n > 9} == {}
    assert list(inspect.signature(table1.run_seed).parameters) == [
        "seed",
        "work",
        "settings",
        "sh",
        "device",
    ]


def cited_files(text: str) -> set[str]:
    """Repository paths a text names: words ending in .py, .md or .ipynb (run outputs under runs/
    and templates with <...> are not repository files)."""
    names = set(re.findall(r"(?<![\w/.<-])([\w-]+(?:/[\w.-]+)*\.(?:py|md|ipynb))\b", text))
    return {n for n in names if not n.startswith("runs/")}


def test_every_cited_file_is_in_the_repository():
    sources = [
        ROOT / "README.md",
        ROOT / "DECISIONS.md",
        *MODULES.values(),
        *ROOT.glob("tests/*.py"),
    ]
    missing = {}
    for src in sources:
        text = src.read_text()
        assert not re.search(r"SPEC(\.md| §)", text), (
            f"{src.name} cites a spec not in this repository"
        )
        for name in cited_files(text):
            folders = ("", "tests", "results", "results/earlier", *FOLDERS)
            if not any((ROOT / folder / name).exists() for folder in folders):
                missing.setdefault(str(src.relative_to(ROOT)), []).append(name)
    assert missing == {}


def layout_rows() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Layout") : readme.index("## Model sizes")]
    return re.findall(r"^\| `([^`]+)`", section, flags=re.M)


def test_the_readme_layout_tables_match_the_tree():
    listed = layout_rows()
    modules = {str(p.relative_to(ROOT)) for p in MODULES.values() if p.name != "__init__.py"}
    assert modules <= set(listed), modules - set(listed)
    assert all((ROOT / name.rstrip("/")).exists() for name in listed), listed
    # the core first, then one table per folder, in the order of the rows
    first_folder_row = next(i for i, name in enumerate(listed) if "/" in name)
    assert set(listed[:first_folder_row]) == {f"{m}.py" for m in CORE}


def test_module_sizes():
    """model.py is the model and cagsr.py the command line alone; no module grows past one long read
    (counted at ruff's 100 columns)."""
    lines = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    assert lines["model"] <= 760 and lines["cagsr"] <= 400
    assert {m: n for m, n in lines.items() if n > 800} == {}
