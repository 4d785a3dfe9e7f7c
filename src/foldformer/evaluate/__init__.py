"""Evaluation suite: effective context length, passkey, BABILong, language modelling, memory and
speed. Every result is a JSON record (`foldformer.evaluate.records`), defined in DESIGN.md §6."""

from foldformer.evaluate.records import load_records, make_record, write_records

__all__ = ["load_records", "make_record", "write_records"]
