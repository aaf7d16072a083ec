"""Language-model support of the ``hf_lm`` family: text corpora (``corpora``), the perplexity protocol
(``perplexity``), the embedded demo model (``embedded``) and lm-eval zero-shot scoring (``zeroshot``)."""
