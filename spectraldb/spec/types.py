"""The spec's field types and strict base section: what every spec model builds on."""

from __future__ import annotations

import unicodedata
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from contract.memory import MAX_BYTES, parse_bytes
from contract.vocabulary import SITES, STRATA


def visible(text: str) -> str:
    """Names and labels reach terminals, tables and pages: control, zero-width and bidirectional
    characters (Unicode Cc, Cf, Zl, Zp) would clear screens, fake lines or look like another name."""
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            raise ValueError(f"holds the invisible or control character U+{ord(ch):04X}; use printable characters")
    return text


Name = Annotated[str, AfterValidator(visible)]
Site = Literal[SITES]
Stratum = Literal[STRATA]
Beta = Annotated[float, Field(ge=0, lt=1)]
Pair = Annotated[list[Beta], Field(min_length=2, max_length=2)]
# a byte budget: 512MiB, 8GiB, 1.5GB or a whole number of bytes (stored as bytes)
Bytes = Annotated[int, BeforeValidator(lambda v: v if v is None else parse_bytes(v)), Field(ge=1, le=MAX_BYTES)]
INT32_MAX = 2**31 - 1  # the store's INTEGER columns


class Section(BaseModel):
    # no NaN or ±inf anywhere: an inf eps or a NaN beta would train and be stored as "done"
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
