"""`specdb query …`: the study's questions, answered from the store (docs/design.md §1).

One command per question declared in spectraldb/verbs.py, made from its declaration: its options,
help and answer are the ones the HTTP service and the notebook reader use.
"""

from __future__ import annotations

import inspect
from typing import List, Optional

import typer

from cli.common import DbOpt, FormatOpt, capped_memory, check_format, reader, translated
from cli.output import printable, render
from spectraldb.verbs import SELECTION, VERBS, Option, Verb

query_app = typer.Typer(no_args_is_help=True, help="The study's questions, answered from the store.")

ANNOTATIONS = {str: Optional[str], int: Optional[int], float: Optional[float], bool: bool, list: Optional[List[str]]}


def typer_option(o: Option):
    """A declared option as a Typer parameter: (annotation, default)."""
    default = ... if o.required else ([o.default] if o.kind is list and o.default is not None else o.default)
    annotation = float if o.required and o.kind is float else ANNOTATIONS[o.kind]
    return annotation, typer.Option(default, o.flag, help=o.help)


StratumOpt, SiteOpt, DivergedOpt, WhereOpt = (typer_option(SELECTION[name])[1]
                                              for name in ("stratum", "site", "include_diverged", "where"))


def _ask(verb: Verb, fmt: str, db, values: dict) -> None:
    """Ask the declared question of the store; print rows (stdout) and notes (stderr)."""
    from spectraldb.bounds import ReadLimits

    check_format(fmt)
    with translated(values.get("where")):
        with capped_memory(ReadLimits.from_env().process_bytes):
            answer = reader(db).ask(verb, values)
    render(answer.rows, fmt, list(verb.columns) if verb.columns else answer.columns)
    for note in answer.all_notes():  # a note can quote the predicate or a stored label
        typer.echo(printable(note), err=True)


def command(verb: Verb):
    """The Typer command of one declared question."""

    def run(**values):
        db, fmt = values.pop("db"), values.pop("fmt")
        _ask(verb, fmt, db, values)

    params = []
    for o in verb.options:
        annotation, default = typer_option(o)
        params.append(inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
    params += [inspect.Parameter("db", inspect.Parameter.KEYWORD_ONLY, default=DbOpt, annotation=Optional[str]),
               inspect.Parameter("fmt", inspect.Parameter.KEYWORD_ONLY, default=FormatOpt, annotation=str)]
    run.__signature__ = inspect.Signature(params)
    run.__annotations__ = {}
    run.__name__ = f"query_{verb.name}"
    run.__doc__ = verb.help
    return run


for _verb in VERBS:
    query_app.command(_verb.name)(command(_verb))
