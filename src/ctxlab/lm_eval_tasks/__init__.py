"""lm-eval task files of ctxlab (YAML beside this file; ``ctxlab.lm_eval.TASKS_DIR``)."""
