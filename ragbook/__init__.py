"""ragbook: Retrieval-Augmented Generation (Lewis et al. 2020), rebuilt step by step.

One module per chapter of the paper: ``data`` (passages z and examples (x, y)), ``retriever``
(p_η(z|x)), ``index`` (MIPS), ``generator`` (p_θ), ``rag`` (Eq. 1 and Eq. 2, their decoders),
``pipeline`` (the whole model), ``train``, ``evaluate``, ``reproduce``, ``plots``, ``cli``.
"""

__version__ = "0.1.0"
