"""Did the alignment work: the metrics the training loop logs and evaluation reports
(:mod:`.metrics`), ``preftune eval`` (:mod:`.evaluate`, run end to end by :mod:`.run`), what is
measured on samples (:mod:`.samples`), the report and the plots (:mod:`.report`, :mod:`.plots`)."""
