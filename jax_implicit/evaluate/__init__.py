"""Evaluation as in the paper: AlpacaEval head-to-head (`alpaca`, with a GPT-4 or a local `judge`),
response ranking (`ranking`, Table 2), instruction similarity (`similarity`, Figure 5), and the
paper's tables aggregated over seeds (`tables`) from the results folder described in `layout`."""
