"""User plugins: Python files or importable modules that register quantizers, models, loss terms,
data sets, optimizers or schedules, imported before a config is validated.

    plugins: [my_quantizer.py, mylab.codeq_parts]

A path (it ends in ``.py`` or names an existing file) is imported under a module name derived from
its absolute path, once per process; anything else is imported as a module. The resolved config
records paths made absolute, so ``--resume``, ``codeq report``, ``codeq export`` and sweeps re-import
the same files from any working directory.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

from codeq.errors import ConfigError, first_line


def is_path(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or Path(spec).is_file()


def resolved_plugin(spec: str) -> str:
    """``spec`` as the config records it: an absolute path for a file, the module name otherwise."""
    return str(Path(spec).expanduser().resolve()) if is_path(spec) else spec


def import_plugin(spec: str, key: str = "plugins") -> None:
    """Import one plugin (a ``.py`` path or a module name); importing the same one again does nothing.

    Raises:
        ConfigError: the file does not exist, or importing it raised (the message names the file and the error).
    """
    path = Path(resolved_plugin(spec)) if is_path(spec) else None
    if path is not None and not path.is_file():
        raise ConfigError(key, f"plugin file {path} does not exist", "fix the path (relative paths are read from the "
                          "directory you start in)")
    try:
        if path is None:
            importlib.import_module(spec)
            return
        name = f"codeq_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        if name in sys.modules:
            return
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    except ConfigError as error:  # a registry refused what the plugin registers
        raise ConfigError(key, f"importing plugin {spec} failed: {error.key}: {error.problem}", error.fix) from error
    except Exception as error:  # noqa: BLE001 - whatever a user's module raises on import is the same config error
        raise ConfigError(key, f"importing plugin {spec} failed: {first_line(error, with_type=True)}",
                          "fix the plugin (run it with --verbose for the traceback)") from error


def import_plugins(specs: object) -> list[str]:
    """Import every plugin of a config's ``plugins`` value; returns them as the config records them.

    Raises:
        ConfigError: ``specs`` is not a list of strings, or a plugin cannot be imported.
    """
    if specs is None:
        return []
    if isinstance(specs, str):
        specs = [specs]
    if not isinstance(specs, list) or not all(isinstance(spec, str) and spec for spec in specs):
        raise ConfigError("plugins", f"must be a list of file paths or module names (got {specs!r})",
                          "write `plugins: [my_parts.py]`")
    for index, spec in enumerate(specs):
        import_plugin(spec, f"plugins.{index}")
    return [resolved_plugin(spec) for spec in specs]
