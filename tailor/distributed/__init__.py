"""Scale-out on Ray: personalize and evaluate users across a cluster with the local runner's own chunk function.

`ray_runner` holds the library (worker pool, bounded dispatch, `ray_eval`, `ray_personalize`); `cli` holds the
command-line pieces. Neither is imported here, so importing tailor never imports Ray.
"""
