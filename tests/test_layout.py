"""The repository's shape: the import graph of the modules has no cycle (lazy imports included),
nothing imports the command line, every file that code, tests, README.md and DECISIONS.md cite is in
the repository, and the README's layout table names every module."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = {p.stem: p for p in ROOT.glob("*.py")}


def imports(path: Path) -> set[str]:
    """The project modules `path` imports, lazy imports (inside functions) included."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return {m for m in out if m in MODULES and m != path.stem}


def test_the_import_graph_has_no_cycle():
    graph = {m: imports(p) for m, p in MODULES.items()}
    done, on_path = set(), []

    def visit(m):
        assert m not in on_path, "import cycle: " + " -> ".join(on_path[on_path.index(m) :] + [m])
        if m in done:
            return
        on_path.append(m)
        for n in sorted(graph[m]):
            visit(n)
        on_path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)
    assert "parallel" in graph["ppo"] and "sft" in graph["cagsr"]  # the graph was read


def test_only_the_command_line_imports_nothing_imports_it():
    users = sorted(m for m, p in MODULES.items() if "cagsr" in imports(p))
    assert users == []
    notebook = (ROOT / "tutorial.ipynb").read_text()
    assert not re.search(r"(from|import) cagsr\b", notebook)


def cited_files(text: str) -> set[str]:
    """Repository paths a text names: words ending in .py, .md or .ipynb (run outputs under runs/ and
    templates with <...> are not repository files)."""
    names = set(re.findall(r"(?<![\w/.<-])([\w-]+(?:/[\w.-]+)*\.(?:py|md|ipynb))\b", text))
    return {n for n in names if not n.startswith("runs/")}


def test_every_cited_file_is_in_the_repository():
    sources = [
        ROOT / "README.md",
        ROOT / "DECISIONS.md",
        *ROOT.glob("*.py"),
        *ROOT.glob("tests/*.py"),
    ]
    missing = {}
    for src in sources:
        text = src.read_text()
        assert not re.search(r"SPEC(\.md| §)", text), (
            f"{src.name} cites a spec that is not in this repository"
        )
        for name in cited_files(text):
            if not any(
                (ROOT / folder / name).exists()
                for folder in ("", "tests", "results", "results/earlier")
            ):
                missing.setdefault(src.name, []).append(name)
    assert missing == {}


def test_the_readme_layout_names_every_module():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Layout") : readme.index("## Model sizes")]
    listed = set(re.findall(r"^\| `([^`]+)` \|", table, flags=re.M))
    assert {f"{m}.py" for m in MODULES} <= listed
    assert all((ROOT / name.rstrip("/")).exists() for name in listed), listed


def test_module_sizes():
    """model.py is the model (its checks and snapshot reading live elsewhere), cagsr.py is the command
    line alone, and no module grows past one long read."""
    lines = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    assert lines["model"] <= 700 and lines["cagsr"] <= 400
    assert {m: n for m, n in lines.items() if n > 650 and m != "model"} == {}


def test_no_runner_imports_another_and_the_shared_plumbing_imports_none():
    runners = {"table1", "reward_study"}
    for m in runners | {"experiments"}:
        assert imports(MODULES[m]) & runners == set(), m


def top_level_names(path: Path) -> set[str]:
    """The functions, classes and constants `path` defines at module level."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


# One home per concept: where each is defined, and nowhere else.
HOMES = {
    "ConfigError": {"checks"},
    "check_fields": {"checks"},  # the config checks every config uses
    "from_pretrained": {"snapshot"},
    "t5_names": {"snapshot"},
    "memory_plan": {"snapshot"},
    "RUN_PROFILE": {"ppo"},
    "RL_PROFILE": {"table1", "reward_study"},  # each kind of run's RL settings
    "SFT_STEPS": {"table1", "reward_study"},
    "rl_start": {"runs"},  # RL from an SFT state
    "is_qa": {"data"},
    "check_enough_prompts": {"ppo"},
    "check_split": {"parallel"},
    "shared_setup": {"experiments"},
    "seed_sft": {"experiments"},
    "seeds_in_workers": {"experiments"},
    "rl_profile": {"experiments"},
    "prepare": {"stages"},
    "train_stages": {"stages"},
    "draw": {"sampling"},
    "rl_temperature": {"bench"},
    "linear_flops": {"bench_gpu"},  # the sampler; the benches' workload
    "Steps": {"sampling"},
    "Rollout": {"sampling"},  # what a rollout records, for both policies
    "build_policy": {"decoder"},
    "policy_config": {"decoder"},
    "prompt_attention": {"decoder"},
    "decoder_names": {"snapshot"},
    "special_mask": {"model"},
    "export_checkpoint": {"export"},
    "config_specials": {"data"},
    "checked_overrides": {"checks"},
    "check_sampling": {"sampling"},
}


def test_each_concept_has_one_home():
    defined = {m: top_level_names(p) for m, p in MODULES.items()}
    where = {name: {m for m, names in defined.items() if name in names} for name in HOMES}
    assert where == HOMES
