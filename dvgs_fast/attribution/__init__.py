"""Pairwise attribution: ``method.attribute(x_source, y_source, x_query, y_query)`` ->
``AttributionResult`` ([n_query, n_source] scores, blockwise, memory-mapped or top-k), for the
gradient methods. The contract is in api.py, the block handling in sink.py."""
from dvgs_fast.attribution.api import AttributionMixin, one_process, query_error
from dvgs_fast.attribution.result import AttributionResult
from dvgs_fast.attribution.sink import ScoreSink

__all__ = ["AttributionMixin", "AttributionResult", "ScoreSink", "one_process", "query_error"]
