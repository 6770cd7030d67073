"""The README stays true to the code: its first commands and its YAML reference."""
from conftest import ROOT
from src.config import markdown_reference, readme_with_reference


def test_readme_yaml_reference_is_generated_from_the_schema():
    readme = (ROOT / "README.md").read_text()
    assert markdown_reference() in readme
    assert readme_with_reference(readme) == readme, "run `make reference` to regenerate README.md's YAML reference"


def test_readme_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[1].startswith("make quickstart") and lines[2].startswith("make test")
    makefile = (ROOT / "Makefile").read_text()
    assert "\nquickstart:" in makefile and "\ntest:" in makefile


def test_readme_shows_the_example_plugin_the_tests_run():
    readme = (ROOT / "README.md").read_text()
    assert "```python\n" + (ROOT / "examples" / "my_parts.py").read_text() + "```" in readme
