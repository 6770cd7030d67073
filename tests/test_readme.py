"""The README stays true to the code: its first commands and its YAML reference."""
import re

from codeq.app.config import markdown_reference, readme_with_reference
from conftest import ROOT


def test_readme_yaml_reference_is_generated_from_the_schema():
    readme = (ROOT / "README.md").read_text()
    assert markdown_reference() in readme
    assert readme_with_reference(readme) == readme, "run `make reference` to regenerate README.md's YAML reference"


def test_readme_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[1].startswith("make quickstart") and lines[2].startswith("make test")
    makefile = (ROOT / "Makefile").read_text()
    assert "\nquickstart:" in makefile and "\ntest:" in makefile


def test_readme_shows_the_examples_the_tests_run():
    readme = (ROOT / "README.md").read_text()
    for example in ("my_parts.py", "own_loop.py"):
        assert "```python\n" + (ROOT / "examples" / example).read_text() + "```" in readme, example
    examples = {path.name: path.read_text() for path in (ROOT / "examples").glob("*.py")}
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    quoted = {name for block in blocks for name, code in examples.items() if block in code}
    assert all(any(block in code for code in examples.values()) for block in blocks)  # verbatim, never paraphrased
    assert {"lightning_module.py", "hf_trainer.py"} <= quoted
