"""The documentation: every config key described and listed, links that resolve, a short README, a site that builds."""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from fedpeft.cli import build_parser
from fedpeft.config import Config, _Section

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = sorted(DOCS.glob("*.md"))


def _load_hook():
    spec = importlib.util.spec_from_file_location("config_reference", DOCS / "hooks" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


hook = _load_hook()


def _walk(model: type[BaseModel], prefix: str = ""):
    """(dotted key, field) of every leaf key, and (dotted, class) of every section, found here
    independently of the hook's own walk."""
    for name, field in model.model_fields.items():
        dotted = f"{prefix}.{name}" if prefix else name
        if inspect.isclass(field.annotation) and issubclass(field.annotation, BaseModel):
            yield dotted, field.annotation
            yield from _walk(field.annotation, dotted)
        else:
            yield dotted, field


def _leaf_keys():
    return {dotted: field for dotted, field in _walk(Config) if not inspect.isclass(field)}


def test_every_config_key_has_a_description():
    keys = _leaf_keys()
    # the walk reaches nested sections (a vacuous walk would pass anything)
    for nested in ("federation.secure_aggregation.num_shares", "privacy.client.noise_multiplier", "seed"):
        assert nested in keys
    assert len(keys) > 80
    undocumented = [key for key, field in keys.items() if not (field.description or "").strip()]
    assert not undocumented, f"add an attribute docstring in fedpeft/config.py for: {undocumented}"
    sections = [dotted for dotted, value in _walk(Config) if inspect.isclass(value)]
    assert "federation.secure_aggregation" in sections
    assert all(inspect.getdoc(value) for _, value in _walk(Config) if inspect.isclass(value))


def test_a_new_key_without_a_description_fails_the_reference():
    class Documented(_Section):
        """A section whose second key a contributor forgot to describe."""

        rounds: int = 1
        """Described."""
        undocumented: float = Field(default=0.5, gt=0)

    class Outer(_Section):
        """A run."""

        inner: Documented = Field(default_factory=Documented)

    with pytest.raises(hook.MissingDescriptionError, match=r"inner\.undocumented"):
        hook.render_reference(Outer)


def test_reference_lists_every_key_with_its_default():
    reference = hook.render_reference()
    missing = [key for key in _leaf_keys() if f"| `{key}` |" not in reference]
    assert not missing, f"not on the generated configuration reference: {missing}"
    assert sorted(hook.all_keys(Config)) == sorted(_leaf_keys())
    # types, bounds and defaults as a TOML file would write them
    assert (
        '| `model.task` | `"sequence-classification" | "causal-lm"` | `"sequence-classification"` |'
        in reference
    )
    assert "| `federation.rounds` | `int, > 0` | `5` |" in reference
    assert "| `train.clip_grad_norm` | `float | None, > 0` | `1` |" in reference
    assert '| `audit.compare` | `list[str]` | `["none"]` |' in reference
    assert "| `federation.secure_aggregation.clipping_range` | `float | None, > 0` | `unset` |" in reference
    assert "## [privacy.client]" in reference and "## [federation.secure_aggregation]" in reference
    # 2**32 outside code would turn bold in Markdown
    assert re.search(r"(?<![`\\])\*\*32", reference.replace("``2**32``", "")) is None


def test_readme_is_at_most_200_lines():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move reference material to docs/"


def _strip_code(text: str) -> str:
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


def _slugs(markdown: str) -> set[str]:
    """Heading anchors as GitHub and MkDocs' toc make them (for the headings used here)."""
    slugs = set()
    for heading in re.findall(r"^#{1,6} (.+)$", _strip_code(markdown), flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        slugs.add(slug)
    return slugs


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = page.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", _strip_code(text))
    assert page != README or any(t.startswith("docs/") for t in targets)
    broken = []
    for target in targets:
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _slugs(file.read_text(encoding="utf-8")):
            broken.append(target)
    assert not broken, f"{page.name}: links to missing files or anchors: {broken}"


def test_readme_sections_included_in_the_docs_exist():
    readme = README.read_text(encoding="utf-8")
    included = {
        name
        for page in PAGES
        for name in re.findall(r'^--8<-- "README\.md:([\w-]+)"$', page.read_text(encoding="utf-8"), re.M)
    }
    assert {"two-commands", "default-run"} <= included
    for name in included:
        start, end = f"--8<-- [start:{name}]", f"--8<-- [end:{name}]"
        assert readme.count(start) == 1 and readme.count(end) == 1, name
        assert readme.index(start) < readme.index(end), name


def _code(text: str) -> str:
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    return "\n".join(blocks + re.findall(r"`([^`\n]+)`", text))


def test_commands_shown_name_real_subcommands_and_files():
    commands = next(
        action.choices for action in build_parser()._actions if hasattr(action, "choices") and action.choices
    )
    unknown, missing = set(), set()
    for page in [README, *PAGES]:
        text = page.read_text(encoding="utf-8")
        code = _code(text)
        for sub in re.findall(r"(?:^|[\s/(=])fedpeft ([a-z][a-z-]*)(?=\s|$)", code, flags=re.MULTILINE):
            if sub not in commands:
                unknown.add(f"{page.name}: fedpeft {sub}")
        for path in re.findall(
            r"\b((?:configs|benchmarks|simulations|scripts)/[\w.-]+\.(?:toml|py|sh))\b", text
        ):
            if not (ROOT / path).exists():
                missing.add(f"{page.name}: {path}")
    assert not unknown, f"commands that do not exist: {sorted(unknown)}"
    assert not missing, f"files that do not exist: {sorted(missing)}"


def test_site_builds_with_warnings_as_errors(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[docs]'")
    pytest.importorskip("material", reason="mkdocs-material is not installed: pip install -e '.[docs]'")
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    reference = (site / "configuration" / "index.html").read_text(encoding="utf-8")
    missing = [key for key in _leaf_keys() if f"<code>{key}</code>" not in reference]
    assert not missing, f"not on the built configuration page: {missing}"
    started = re.sub(r"<[^>]+>", "", (site / "getting-started" / "index.html").read_text(encoding="utf-8"))
    assert "bash scripts/install.sh &amp;&amp; .venv/bin/python -m pytest" in started
    assert "--8&lt;--" not in started  # the README's sections were included, not shown
