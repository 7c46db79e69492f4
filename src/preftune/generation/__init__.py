"""Generation from the policy and what turns samples into training signal: the rollout interface
and its engines (:mod:`.rollout`, :mod:`.vllm_engine`), sampling and scoring samples
(:mod:`.sampling`), the reward interface, a reward-model folder or ``module:function``
(:mod:`.scoring`), and the rules that pair scored samples (:mod:`.pair_rules`)."""
