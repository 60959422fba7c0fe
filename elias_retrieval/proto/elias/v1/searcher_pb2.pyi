from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SparseFeatures(_message.Message):
    __slots__ = ("indices", "values")
    INDICES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    indices: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, indices: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class Query(_message.Message):
    __slots__ = ("text", "sparse", "embedding")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    text: str
    sparse: SparseFeatures
    embedding: DenseEmbedding
    def __init__(self, text: _Optional[str] = ..., sparse: _Optional[_Union[SparseFeatures, _Mapping]] = ..., embedding: _Optional[_Union[DenseEmbedding, _Mapping]] = ...) -> None: ...

class DenseEmbedding(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class SearchParams(_message.Message):
    __slots__ = ("k", "beam_size", "shortlist_size", "explain", "rerank")
    K_FIELD_NUMBER: _ClassVar[int]
    BEAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHORTLIST_SIZE_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    RERANK_FIELD_NUMBER: _ClassVar[int]
    k: int
    beam_size: int
    shortlist_size: int
    explain: bool
    rerank: bool
    def __init__(self, k: _Optional[int] = ..., beam_size: _Optional[int] = ..., shortlist_size: _Optional[int] = ..., explain: _Optional[bool] = ..., rerank: _Optional[bool] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("query", "params")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    query: Query
    params: SearchParams
    def __init__(self, query: _Optional[_Union[Query, _Mapping]] = ..., params: _Optional[_Union[SearchParams, _Mapping]] = ...) -> None: ...

class SearchBatchRequest(_message.Message):
    __slots__ = ("queries", "params")
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedCompositeFieldContainer[Query]
    params: SearchParams
    def __init__(self, queries: _Optional[_Iterable[_Union[Query, _Mapping]]] = ..., params: _Optional[_Union[SearchParams, _Mapping]] = ...) -> None: ...

class Explanation(_message.Message):
    __slots__ = ("cluster", "path_score", "label_score")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    PATH_SCORE_FIELD_NUMBER: _ClassVar[int]
    LABEL_SCORE_FIELD_NUMBER: _ClassVar[int]
    cluster: int
    path_score: float
    label_score: float
    def __init__(self, cluster: _Optional[int] = ..., path_score: _Optional[float] = ..., label_score: _Optional[float] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("index", "label_id", "name", "score", "explanation")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    index: int
    label_id: str
    name: str
    score: float
    explanation: Explanation
    def __init__(self, index: _Optional[int] = ..., label_id: _Optional[str] = ..., name: _Optional[str] = ..., score: _Optional[float] = ..., explanation: _Optional[_Union[Explanation, _Mapping]] = ...) -> None: ...

class SearchResult(_message.Message):
    __slots__ = ("hits", "method")
    HITS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    method: str
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ..., method: _Optional[str] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("result", "index_version")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    result: SearchResult
    index_version: str
    def __init__(self, result: _Optional[_Union[SearchResult, _Mapping]] = ..., index_version: _Optional[str] = ...) -> None: ...

class SearchBatchResponse(_message.Message):
    __slots__ = ("results", "index_version")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SearchResult]
    index_version: str
    def __init__(self, results: _Optional[_Iterable[_Union[SearchResult, _Mapping]]] = ..., index_version: _Optional[str] = ...) -> None: ...

class GetIndexInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SearchDefaults(_message.Message):
    __slots__ = ("k", "beam_size", "shortlist_size")
    K_FIELD_NUMBER: _ClassVar[int]
    BEAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHORTLIST_SIZE_FIELD_NUMBER: _ClassVar[int]
    k: int
    beam_size: int
    shortlist_size: int
    def __init__(self, k: _Optional[int] = ..., beam_size: _Optional[int] = ..., shortlist_size: _Optional[int] = ...) -> None: ...

class IndexInfo(_message.Message):
    __slots__ = ("index_version", "num_labels", "num_clusters", "kappa", "dim", "encoder", "num_features", "query_kinds", "defaults", "max_k", "max_shortlist_size", "max_batch_queries", "label_weights_dtype", "device", "reranker")
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_LABELS_FIELD_NUMBER: _ClassVar[int]
    NUM_CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    KAPPA_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    NUM_FEATURES_FIELD_NUMBER: _ClassVar[int]
    QUERY_KINDS_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    MAX_SHORTLIST_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_QUERIES_FIELD_NUMBER: _ClassVar[int]
    LABEL_WEIGHTS_DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    RERANKER_FIELD_NUMBER: _ClassVar[int]
    index_version: str
    num_labels: int
    num_clusters: int
    kappa: int
    dim: int
    encoder: str
    num_features: int
    query_kinds: _containers.RepeatedScalarFieldContainer[str]
    defaults: SearchDefaults
    max_k: int
    max_shortlist_size: int
    max_batch_queries: int
    label_weights_dtype: str
    device: str
    reranker: bool
    def __init__(self, index_version: _Optional[str] = ..., num_labels: _Optional[int] = ..., num_clusters: _Optional[int] = ..., kappa: _Optional[int] = ..., dim: _Optional[int] = ..., encoder: _Optional[str] = ..., num_features: _Optional[int] = ..., query_kinds: _Optional[_Iterable[str]] = ..., defaults: _Optional[_Union[SearchDefaults, _Mapping]] = ..., max_k: _Optional[int] = ..., max_shortlist_size: _Optional[int] = ..., max_batch_queries: _Optional[int] = ..., label_weights_dtype: _Optional[str] = ..., device: _Optional[str] = ..., reranker: _Optional[bool] = ...) -> None: ...
