"""A YAML reader for the block-style subset that serde_yaml writes.

Python's standard library has no YAML parser, and the stand-in must run
with the standard library only. serde_yaml (libyaml's emitter) writes block
mappings, block sequences (also "indentless" ones under a mapping key),
plain, 'single' and "double" quoted scalars, `[]`/`{}` for empty
collections, and `|`/`|-` literal blocks for multi-line strings. Anything
else raises YamlError rather than being guessed at.
"""
import json
import re

__all__ = ["YamlError", "load"]

_INT = re.compile(r"^[-+]?[0-9]+$")
_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")


class YamlError(ValueError):
    pass


def scalar(text):
    text = text.strip()
    if text.startswith("'"):
        if len(text) < 2 or not text.endswith("'"):
            raise YamlError(f"unterminated quoted scalar: {text}")
        return text[1:-1].replace("''", "'")
    if text.startswith('"'):
        try:
            return json.loads(text)
        except ValueError as e:
            raise YamlError(f"unsupported double-quoted scalar {text}: {e}")
    if text in ("", "~", "null", "Null", "NULL"):
        return None
    if text in ("true", "True", "TRUE"):
        return True
    if text in ("false", "False", "FALSE"):
        return False
    if text == "[]":
        return []
    if text == "{}":
        return {}
    if text[0] in "[{&*!|>%@`":
        raise YamlError(f"unsupported YAML construct: {text}")
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        return float(text)
    lowered = text.lower()
    if lowered in (".inf", "+.inf"):
        return float("inf")
    if lowered == "-.inf":
        return float("-inf")
    if lowered == ".nan":
        return float("nan")
    return text


def _split_key(text):
    """`key: rest` or `key:` -> (key, rest); None when the line is not a mapping entry."""
    if text[0] in "'\"":
        quote = text[0]
        i = 1
        while i < len(text):
            if text[i] == quote:
                if quote == "'" and text[i + 1:i + 2] == "'":
                    i += 2
                    continue
                if quote == '"' and text[i - 1] == "\\":
                    i += 1
                    continue
                break
            i += 1
        key, after = text[:i + 1], text[i + 1:]
        if after == ":" or after.startswith(": "):
            return scalar(key), after[1:].strip()
        return None
    match = re.match(r"^([^#\[\]{},:][^:]*?|[^#\[\]{},:]):(?: (.*))?$", text)
    if not match:
        return None
    return match.group(1), (match.group(2) or "").strip()


class _Parser:
    def __init__(self, text):
        self.lines = []
        for raw in text.splitlines():
            stripped = raw.strip()
            if stripped in ("", "---", "...") or stripped.startswith("#"):
                if stripped == "..." or (stripped == "---" and self.lines):
                    raise YamlError("only one document is supported")
                self.lines.append((None, raw))
                continue
            if "\t" in raw[:len(raw) - len(raw.lstrip())]:
                raise YamlError("tabs are not allowed in indentation")
            self.lines.append((len(raw) - len(raw.lstrip(" ")), raw))
        self.i = 0

    def skip_blank(self):
        while self.i < len(self.lines) and self.lines[self.i][0] is None:
            self.i += 1

    def peek(self):
        self.skip_blank()
        if self.i >= len(self.lines):
            return None, None
        indent, raw = self.lines[self.i]
        return indent, raw.strip()

    def node(self, indent):
        _, text = self.peek()
        if text == "-" or text.startswith("- "):
            return self.sequence(indent)
        return self.mapping(indent)

    def sequence(self, indent):
        items = []
        while True:
            level, text = self.peek()
            if level != indent or not (text == "-" or text.startswith("- ")):
                return items
            rest = text[1:].lstrip()
            if rest == "":
                self.i += 1
                child, _ = self.peek()
                items.append(self.node(child) if child is not None and child > indent else None)
            elif _split_key(rest) is not None or rest.startswith("- "):
                # The item is a collection starting on this line: re-read the
                # line as if it began at the item's column.
                column = indent + len(text) - len(rest)
                self.lines[self.i] = (column, " " * column + rest)
                items.append(self.node(column))
            else:
                self.i += 1
                items.append(scalar(rest))

    def mapping(self, indent):
        result = {}
        while True:
            level, text = self.peek()
            if level != indent or text == "-" or text.startswith("- "):
                return result
            entry = _split_key(text)
            if entry is None:
                raise YamlError(f"line {self.i + 1}: expected `key: value`, got {text!r}")
            key, rest = entry
            if key in result:
                raise YamlError(f"line {self.i + 1}: duplicate key {key!r}")
            self.i += 1
            if rest in ("|", "|-", "|+"):
                result[key] = self.literal(indent, rest)
            elif rest == "":
                child, child_text = self.peek()
                nested = child is not None and (
                    child > indent or (child == indent and (child_text == "-" or child_text.startswith("- "))))
                result[key] = self.node(child) if nested else None
            else:
                result[key] = scalar(rest)

    def literal(self, indent, style):
        block = []
        while self.i < len(self.lines):
            level, raw = self.lines[self.i]
            if level is not None and level <= indent:
                break
            block.append(raw)
            self.i += 1
        while block and not block[-1].strip():
            block.pop()
        content = [line for line in block if line.strip()]
        margin = min((len(line) - len(line.lstrip(" ")) for line in content), default=0)
        text = "\n".join(line[margin:] for line in block)
        return text if style == "|-" else text + "\n"


def load(text):
    parser = _Parser(text)
    indent, _ = parser.peek()
    if indent is None:
        return None
    value = parser.node(indent)
    leftover, text = parser.peek()
    if leftover is not None:
        raise YamlError(f"line {parser.i + 1}: unexpected {text!r}")
    return value
