"""A project's declared dependencies become an EnvSpec: read from uv.lock, requirements*.txt or
pyproject.toml, with a digest that ignores comments, order and blank lines but not the requirements
or the Python version; an oversized declaration is refused; old specs without one still decode."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dtf import pyenv
from dtf.limits import MAX_ENV_REQUIREMENTS_BYTES
from dtf.spec import SpecError, TaskSpec, spec_from_json

names = st.from_regex(r"[a-z][a-z0-9]{0,8}(==[0-9]\.[0-9])?", fullmatch=True)


def test_a_project_without_declared_dependencies_has_no_env_and_auto_falls_back_to_the_system(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[tool.pytest.ini_options]\n")
    assert pyenv.derive(tmp_path, "3.11") is None
    assert pyenv.choose("auto", tmp_path, "3.11") is None
    assert pyenv.choose("uv", tmp_path, "3.11").requirements == []
    (tmp_path / "requirements.txt").write_text("six\n")
    assert pyenv.choose("system", tmp_path, "3.11") is None


def test_requirements_files_are_preferred_to_pyproject_and_lose_comments_and_options(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "p"\ndependencies = ["attrs"]\n')
    (tmp_path / "requirements.txt").write_text("# pins\n-r requirements-test.txt\nsix==1.17.0  # why\n\n")
    (tmp_path / "requirements-test.txt").write_text("--index-url https://x\ntext-unidecode\n")
    env = pyenv.derive(tmp_path, "3.12")
    assert env.requirements == ["six==1.17.0", "text-unidecode"]
    assert env.source == "requirements-test.txt, requirements.txt" and env.python == "3.12"


def test_pyproject_dependencies_include_the_test_extras_and_groups(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "p"\ndependencies = ["attrs>=22"]\n'
        '[project.optional-dependencies]\ntest = ["six"]\ndocs = ["sphinx"]\n'
        '[dependency-groups]\ndev = ["toolz", {include-group = "test"}]\n')
    assert pyenv.derive(tmp_path, "3.11").requirements == ["attrs>=22", "six", "toolz"]


def test_a_uv_lock_pins_its_packages_but_not_the_project_itself(tmp_path):
    (tmp_path / "uv.lock").write_text(
        'version = 1\n[[package]]\nname = "p"\nversion = "0.1"\nsource = { editable = "." }\n'
        '[[package]]\nname = "six"\nversion = "1.17.0"\nsource = { registry = "https://pypi.org/simple" }\n'
        '[[package]]\nname = "numpy"\nversion = "1.26.4"\nsource = { registry = "https://pypi.org/simple" }\n'
        '[[package]]\nname = "numpy"\nversion = "2.1.0"\nsource = { registry = "https://pypi.org/simple" }\n')
    assert pyenv.derive(tmp_path, "3.11").requirements == ["numpy", "six==1.17.0"]


def test_an_oversized_declaration_is_refused_at_submit(tmp_path):
    lines = "".join(f"package{i}\n" for i in range(MAX_ENV_REQUIREMENTS_BYTES // 8))
    (tmp_path / "requirements.txt").write_text(lines)
    with pytest.raises(pyenv.EnvError, match="exceed"):
        pyenv.derive(tmp_path, "3.11")


@given(st.lists(names, min_size=1, max_size=8), st.randoms())
def test_the_digest_ignores_order_duplicates_and_comments(reqs, rnd):
    shuffled = [*reqs, reqs[0]]
    rnd.shuffle(shuffled)
    text = "# header\n" + "\n\n".join(f"{r}   # note" for r in shuffled) + "\n"
    assert pyenv.make("3.11", pyenv.requirement_lines(text), "a").digest == pyenv.make("3.11", reqs, "b").digest


@given(st.lists(names, min_size=1, max_size=8, unique=True), names)
def test_the_digest_changes_when_a_requirement_or_the_python_does(reqs, extra):
    base = pyenv.make("3.11", reqs, "x")
    if extra not in reqs:
        assert pyenv.make("3.11", [*reqs, extra], "x").digest != base.digest
    assert pyenv.make("3.12", reqs, "x").digest != base.digest


def test_a_spec_carries_its_env_and_old_specs_decode_without_one():
    env = pyenv.make("3.11", ["six"], "requirements.txt")
    spec = TaskSpec(type="test", config={"paths": ["t"]}, env=env)
    assert spec_from_json(msgspec.json.encode(spec)).env == env
    assert spec_from_json(b'{"type": "test", "config": {"paths": ["t"]}}').env is None


def test_a_spec_whose_env_digest_does_not_match_its_requirements_is_refused():
    env = msgspec.structs.replace(pyenv.make("3.11", ["six"], "r"), requirements=["toolz"])
    with pytest.raises(SpecError, match="digest"):
        spec_from_json(msgspec.json.encode(TaskSpec(type="test", config={"paths": ["t"]}, env=env)))
