"""Recipes: what one kind of training computes, each a plain ``train`` in labelled phases on the
engine (:mod:`preftune.engine`).

* :mod:`.dpo` — the DPO family on preference pairs (``preftune train``)
* :mod:`.kto` — KTO and APO-zero on unpaired examples (``preftune train --loss kto``)
* :mod:`.sft` — supervised fine-tuning (``preftune sft``)
* :mod:`.reward` — Bradley–Terry reward models (``preftune rm train``)
* :mod:`.online` — online DPO: rounds of sample, score, pair, train (``preftune online``)
* :mod:`.ppo` — PPO with a KL penalty (``preftune ppo``)
* :mod:`.pipeline` — named stages of the above from one file (``preftune pipeline run``)
"""
