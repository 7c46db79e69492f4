"""The models: loading causal LMs, reward models and tokenizers (:mod:`.load`), per-sequence
log-probs through a chunked head that never builds the full logits (:mod:`.logps`, whole sets:
:mod:`.set_logps`), the attention masks of the shared layouts (:mod:`.attention`), reward and
value heads read at a sequence's last token (:mod:`.reward_head`), and the reference strategies
(:mod:`.reference`)."""
