"""The error type of every config problem, the check that raises it, and the strict YAML parser whose errors are
ConfigErrors naming the file."""

import typing

import yaml


class ConfigError(ValueError):
    """A params file or override that cannot be turned into a valid Config."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error: PyYAML keeps the last value
    silently, so a second `distill:` section would quietly replace the first."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges are meant to be overridden by the keys beside them
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # PyYAML's own construct_mapping reports it
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{self.name}: line {line}: duplicate key {key!r} (first at line {seen[key]}); "
                                  "keep one of them")
            seen[key] = line
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, name: str):
    """YAML text parsed strictly; a ConfigError in one line naming `name` (a file), the line and the problem."""
    loader = _StrictLoader(text)
    loader.name = name  # marks and messages say the file, not "<unicode string>"
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        problem = " ".join(filter(None, [err.context, err.problem]))
        raise ConfigError(f"{name}: {where}: not valid YAML ({problem})") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{name}: not valid YAML ({' '.join(str(err).split())})") from err
    finally:
        loader.dispose()
