"""Every `safeserve` command line written in the documentation (README, model cards, the
history under docs/) names a command and options that exist: a renamed or removed option must
be renamed in the text that tells users (or a later session) how to reproduce a number."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import typer

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted(REPO.glob("models/*/MODEL_CARD.md")),
        *sorted(REPO.glob("docs/**/*.md"))]
SHELL_FENCES = ("", "bash", "sh", "console", "shell")


def shell_blocks(text: str) -> list[str]:
    """The bodies of the fenced blocks that hold shell, continuation lines joined."""
    blocks, body, lang = [], None, ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if body is None:
                body, lang = [], line.strip()[3:].strip()
            else:
                if lang in SHELL_FENCES:
                    blocks.append(re.sub(r"\\\n\s*", " ", "\n".join(body)))
                body = None
        elif body is not None:
            body.append(line)
    return blocks


def command_lines(text: str) -> list[str]:
    """`safeserve ...` as written in shell blocks and in inline code, cut at the first shell
    operator or comment."""
    found = [line[line.index("safeserve "):] for block in shell_blocks(text)
             for line in block.splitlines()
             if "safeserve " in line and not line.lstrip().startswith("#")]
    found += re.findall(r"`(safeserve [^`\n]+)`", text)
    return [re.split(r"\s(?:#|\||&&|;|>|2>)", c)[0] for c in found]


def resolve(root, words: list[str]):
    """(command, its path, the words after it) for a command line's words."""
    node, path = root, []
    while hasattr(node, "commands") and words and words[0] in node.commands:
        node = node.commands[words[0]]
        path.append(words.pop(0))
    return node, path, words


def test_every_documented_command_and_option_exists():
    from safeserve.server.cli import _register_plugins, app

    _register_plugins()
    root = typer.main.get_command(app)
    checked, wrong = 0, []
    for doc in DOCS:
        for line in command_lines(doc.read_text()):
            try:
                words = shlex.split(line)[1:]
            except ValueError:  # an unbalanced quote in prose: not a command line
                continue
            node, path, rest = resolve(root, words)
            where = f"{doc.name}: {line.strip()[:120]}"
            if hasattr(node, "commands"):  # a group: the next word must be one of its commands
                if rest and not rest[0].startswith(("-", "...", "<")):
                    wrong.append(f"{where}: no command {rest[0]!r} in `safeserve "
                                 f"{' '.join(path)}`")
                continue
            options = {o for p in node.params for o in (*p.opts, *p.secondary_opts)}
            checked += 1
            for word in rest:
                flag = word.split("=")[0]
                if flag.startswith("--") and flag not in options | {"--help"}:
                    wrong.append(f"{where}: `safeserve {' '.join(path)}` has no {flag}")
    assert not wrong, "\n".join(wrong)
    assert checked > 100, checked  # the parser found the documents' commands
