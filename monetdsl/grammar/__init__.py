"""The .monet language: the Lark grammar (``monet.lark``), the parser and the printer."""
from .parser import Document, load_schedule, load_spec, parse_document, parse_schedule, parse_spec, read_text
from .printer import format_constraints, format_network, format_schedule, format_spec

__all__ = [
    "Document",
    "parse_document",
    "parse_spec",
    "load_spec",
    "parse_schedule",
    "load_schedule",
    "read_text",
    "format_network",
    "format_constraints",
    "format_spec",
    "format_schedule",
]
