"""The README opens with exactly two set-up commands, and CI runs the second one verbatim."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _setup_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_two_commands_and_ci_runs_the_test_command():
    commands = _setup_commands()
    assert len(commands) == 2
    main_job, tests = commands
    assert "fedopt run experiments/configs/quickstart.toml" in main_job
    assert tests.endswith("pytest")
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert tests in ci
    assert (REPO / "experiments" / "configs" / "quickstart.toml").is_file()


def test_the_readme_algorithm_is_the_example_package_verbatim():
    text = (REPO / "README.md").read_text()
    block = text.split("```python\n@conformance(", 1)[1].split("```", 1)[0]
    source = (REPO / "examples" / "my_method" / "my_method" / "algorithm.py").read_text()
    assert "@conformance(" + block in source
