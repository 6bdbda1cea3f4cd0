"""Pictures: next-byte entropy and the patches it cuts, the paper's Fig. 4 (`entropy`), and
training curves from metrics records (`curves`), drawn on a headless matplotlib canvas
(`canvas`).

Matplotlib is the optional `[plot]` extra: it is imported only where a figure is drawn, so that
the figure data (and everything else in bltjax) works without it. Nothing here reads a workdir:
`bltjax.train.run_curves` and `bltjax.train.entropy_figure` bring the records and entropies.
"""
