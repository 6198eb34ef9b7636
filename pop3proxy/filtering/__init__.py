"""The filter plugin API and byte-exact header editing: everything a filter imports.

A filter is a class with a `name` and a call `(message: bytes, context: FilterContext) ->
FilterOutcome`. Loading (`filtering.loader`) and the pipeline (`filtering.pipeline`) live in
their own modules; importing this package pulls in neither trio nor the metrics.
"""

from pop3proxy.filtering.api import (
    ACTIONS,
    ENTRY_POINT_GROUP,
    WARNING_HEADER,
    Action,
    CommonOptions,
    Filter,
    FilterConfigError,
    FilterContext,
    FilterOutcome,
    FilterResult,
)
from pop3proxy.filtering.headers import (
    HeaderField,
    add_header,
    format_header,
    header_end,
    line_ending,
    remove_headers,
    split_header,
)

__all__ = [
    "ACTIONS",
    "ENTRY_POINT_GROUP",
    "WARNING_HEADER",
    "Action",
    "CommonOptions",
    "Filter",
    "FilterConfigError",
    "FilterContext",
    "FilterOutcome",
    "FilterResult",
    "HeaderField",
    "add_header",
    "format_header",
    "header_end",
    "line_ending",
    "remove_headers",
    "split_header",
]
