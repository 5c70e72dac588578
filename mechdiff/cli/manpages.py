"""The text of ``mechdiff analyze <study> --help``: what each study does, its outputs and examples, and the help
of Config fields that carry none of their own (no ``metadata["help"]``, no comment in the Config's source)."""

from __future__ import annotations

__all__ = ["STUDY_MAN", "FIELD_HELP", "DATASET_HELP"]

# Study -> its man page (before the generated option list). Flags are the Config's fields, dashed.
STUDY_MAN: dict[str, str] = {
    "knowledge": """Where are facts stored, and did post-training move them? Activation patching over layer x position.

    DESCRIPTION

    For each pair of a true and a false statement of equal token length, the false prompt ("<shots>
    <statement> This statement is:") is run with one activation (site, layer, token position) replaced by
    the true prompt's, and the change in logit(TRUE answer) - logit(FALSE answer) at the last token is
    normalised per pair: 0 = the false run, 1 = the true run (--normalisation logit), or the paper's
    (PD_patched - PD_false) / (1 - PD_false) with PD = P(TRUE) - P(FALSE) (--normalisation paper). Every
    model of the group is swept on its own; with --cross, the base model's true-prompt activations are also
    patched into each post model's false runs, and each post model's into the base model's. Positions are
    grouped by role (context, subject, object, final, other) and averaged over pairs. By default only the
    statement's tokens are patched (--positions statement).

    The verdict ("knowledge storage unchanged") is decided against controls computed in the same run: a
    bootstrap 95% interval over pairs on the base-vs-post heatmap correlation, a null from permuted heatmaps,
    the split-half reliability of each heatmap (its ceiling), cross-model patching in both directions, and,
    with --control-model, an unrelated model's correlation with the base heatmap. It is inconclusive when a
    model does not tell the pairs apart or a heatmap does not reproduce itself.

    INPUTS

    PAIRS   CSV with columns true_statement, false_statement, true_answer, false_answer, topic
    SHOTS   few-shot examples (shots.json): auto finds one beside PAIRS

    OUTPUTS

    OUT/knowledge/results.zarr   effect per run, site, pair, layer, position; mean / std heatmaps on role
                                 slots; differences between models; attribution estimates.
    OUT/knowledge/summary.json   every number: heatmap correlations and their controls, cross-model effect,
                                 peak layers, max |difference| per token group, timings.
    OUT/knowledge/*.png          heatmaps side by side with their binned difference; attribution vs exact.

    EXAMPLES

      mechdiff analyze knowledge --out results
      mechdiff analyze knowledge --base meta-llama/Llama-3.1-8B --post meta-llama/Llama-3.1-8B-Instruct --pairs pairs.csv --device cuda
      mechdiff analyze knowledge --normalisation paper --control-model path/to/unrelated-model --out results

    EXIT STATUS

    0 on success, 2 on bad input (pairs of unequal token length, models with different tokenizers, ...).
    """,
    "confidence": """Do entropy neurons explain the confidence change? Last-layer MLP neurons compared across models.

    DESCRIPTION

    Per model, every neuron of the last MLP layer gets its output-weight norm and the variance over the
    vocabulary of the cosine between its write direction and each unembedding vector, on weights processed as
    TransformerLens does (--weight-processing transformer_lens). Candidates: the top --q by norm, then the --n
    with the lowest variance. Each model's candidates are mean-ablated, and so are --controls sets of
    norm-matched random neurons: the candidates count as entropy neurons only if their mean |entropy change|
    per token beats the controls' 95% quantile.

    "Entropy neurons shared": the candidate IoU between models must beat the IoU of extreme-ranked sets of the
    same size and of random sets from the top-q by norm, and the candidates must be entropy neurons in both
    models. "Entropy neurons do not explain the confidence change" (with --patch): the candidates' activations
    are patched from one model into the other, and the fraction of the entropy change that moves with them is
    compared with norm-matched random sets.

    INPUTS

    TEXTS   CSV / JSON / JSONL of texts \\[default: the embedded fact sentences]

    OUTPUTS

    OUT/confidence/results.zarr  norm, logit variance, candidate flags per model and neuron; IoU matrix and
                                 baselines; entropy and max probability per model and condition.
    OUT/confidence/summary.json  every number and the findings' verdicts.
    OUT/confidence/*.png         norm vs logit-variance scatter per model, IoU table, Venn diagram.

    EXAMPLES

      mechdiff analyze confidence --out results
      mechdiff analyze confidence --base meta-llama/Llama-3.1-8B --post meta-llama/Llama-3.1-8B-Instruct --texts texts.csv --q 0.25 --n 10

    EXIT STATUS

    0 on success, 2 on bad input (models of different architectures, a bad --q / --n, an unreadable text file).
    """,
    "truthfulness": """Is there a linear truth direction, and do base and post-trained models share it?

    DESCRIPTION

    Extracts resid_post at the statement's last two tokens for every model into the store, resuming finished
    shards. Then, per model and layer: the difference-of-means direction (true minus false) fitted on the
    train split of all topics but a held-out one, and a 1-D probe's accuracy on the held-out topic; the best
    layer is the one with the best validation accuracy, or the one --probe-layer gives, for every model (the
    paper's protocol). --center-by-topic subtracts each topic's mean activation first (the paper's centring).
    Across models: cosine of the directions per layer and probe transfer. Finally the intervention: on few-shot
    prompts ending in --suffix, the direction, scaled by the mean difference times --coef, is added at the
    statement's last two tokens of false statements (at --iv-layers) and subtracted from true ones; the
    normalised intervention effect NIE is 1 when statements move all the way to the other label's mean.

    The verdict (agrees / disagrees / inconclusive) is decided against controls from the same run: a
    shuffled-label null of the cross-model cosine, a split-half reliability ceiling, and bootstrap 95%
    intervals.

    INPUTS

    STATEMENTS  CSVs (statement,label,topic[,split]) or a directory of truth_*.csv
    SHOTS       JSON {topic: [[statement, label], ...]} \\[default: shots.json beside the statements]

    OUTPUTS

    OUT/truthfulness/results.zarr, summary.json (every number and the findings), cosine_by_layer.png,
    probe_accuracy_by_layer.png, transfer_table.png, nie_table.png, pca.png; the activations in STORE.

    EXAMPLES

      mechdiff analyze truthfulness --out results/
      mechdiff analyze truthfulness --base meta-llama/Llama-3.1-8B --post meta-llama/Llama-3.1-8B-Instruct --statements geometry_of_truth/ --heldout-topics cities --iv-layers 8:13 --coef 2 --out results/ --device cuda

    EXIT STATUS

    0 on success, 2 on bad input (an unknown topic, a layer the model lacks, an unreadable file, ...).
    """,
    "refusal": """Find each model's refusal direction; test whether base and post-trained models share it.

    WHAT IT DOES

      1. Extracts (resumable) both models' residual stream at every layer and post-instruction position for
         HARMFUL and HARMLESS instructions, each model in its own template and in its partner's (for the
         template-matched comparison), into STORE.
      2. Candidates: mean(harmful) - mean(harmless) per (layer, position), on the train rows.
      3. Greedy completions of the test rows, unsteered: a model that does not refuse harmful prompts more
         often than harmless ones is not searched for a direction and not steered. For each model that
         refuses, chooses the (layer, position) on validation rows; the --rerank best are re-scored by
         greedy validation completions, which also picks the addition coefficient (--addition-coefs). The
         last --skip-last fraction of layers is never chosen.
      4. Cosine between the models' directions, per layer and chosen ones.
      5. Refusal score (share of completions containing a refusal phrase) plain, with a direction ablated
         (harmful prompts) and added (harmless prompts); own and transferred directions.
      6. The verdict, against a shuffled-label null and a split-half ceiling of the template-matched cosines.

    THE PAPER'S RECIPE

      --match prefix --addition-unit --addition-scope all --kl-max 0.1

    SPLITS

      A "split" column (train / val / test) is used when present; missing splits are drawn from the train
      rows at random (--n-val, --n-eval, --seed).

    OUTPUTS

      OUT/refusal/summary.json   every number, the findings, every completion
      OUT/refusal/results.zarr   directions, selection scores, cosines, scores
      OUT/refusal/*.png          cosine by layer, refusal scores, selection
      STORE                      activations (default OUT/store.zarr)

    EXAMPLE

      mechdiff analyze refusal --harmful data/instructions_harmful.csv --harmless data/instructions_harmless.csv --out results

    EXIT STATUS

    0 on success, 2 on bad input.
    """,
}

# (study, dotted field) -> help, for fields whose Config gives none. A field missing here still gets its flag.
FIELD_HELP: dict[tuple[str, str], str] = {
    ("knowledge", "sites"): "Sites to patch: resid_pre, resid_post, attn_out, mlp_out, mlp_act.",
    ("knowledge", "layers"): "Layers to patch: all, a list 0,3,5, or a range 2:6 (end exclusive).",
    ("knowledge", "cross"): "Also patch the base model's activations into each post model, and each post model's into the base model.",
    ("knowledge", "attribution"): "Also compute attribution-patching estimates.",
    ("knowledge", "attribution_method"): "atp (gradient x difference), atp+qk, atp+gd, atp* (Kramar et al.'s corrections) or ig (integrated gradients, 5 steps); its r against exact patching is reported.",
    ("knowledge", "limit"): "At most this many pairs, spread over topics.",
    ("knowledge", "positions"): "statement (leave the few-shot context unpatched) or all.",
    ("knowledge", "few_shot"): "Prefix each statement with its topic's few-shot examples (--shots, or a shots.json beside --pairs); --no-few-shot: zero-shot prompts.",
    ("knowledge", "min_gap"): "Leave out of the normalised statistics pairs with logit-diff(true) - logit-diff(false) <= this (none: keep all).",
    ("knowledge", "token_budget"): "Rows x tokens per batched pass.",
    ("knowledge", "normalisation"): "Patching effect per pair: logit = (LD_patched - LD_false) / (LD_true - LD_false), LD = logit(TRUE) - logit(FALSE); paper = Du et al.'s (PD_patched - PD_false) / (1 - PD_false), PD = P(TRUE) - P(FALSE).",
    ("knowledge", "control_model"): "An unrelated model of the same tokenizer: its heatmap's correlation with the base model's is the control a 'storage unchanged' verdict must clear.",
    ("knowledge", "controls.seed"): "Seed of the permutations, resamples and split halves.",
    ("confidence", "layer"): "MLP layer (negative counts from the end).",
    ("confidence", "text_column"): "Column holding the text, if not one of the usual names.",
    ("confidence", "token_budget"): "Padded tokens per batch.",
    ("confidence", "weight_processing"): "transformer_lens: fold the final norm's gain into W_U and centre it, as TransformerLens and the paper do; none: the raw lm_head.",
    ("confidence", "iou_draws"): "Random neuron sets drawn for the IoU baselines.",
    ("confidence", "n_bootstrap"): "Bootstrap resamples of the texts for the explained-fraction interval.",
    ("confidence", "q_factors"): "The IoU's stability range: q times each of these.",
    ("confidence", "patch"): "Patch the candidates' activations between the models to test whether they carry the confidence change.",
    ("truthfulness", "heldout_topics"): "Topics to test probes on, comma-separated \\[default: every topic in turn].",
    ("truthfulness", "iv_layers"): "Intervention layers: a list 3,4,5 or a range 3:6 (end exclusive) \\[default: a window of --iv-window layers ending at each model's best layer].",
    ("truthfulness", "coef"): "Intervention strength in units of the mean difference between true and false statements.",
    ("truthfulness", "intervene"): "Run the intervention (needs the models) or only the store analyses.",
    ("truthfulness", "n_shots"): "Few-shot examples in each intervention prompt.",
    ("truthfulness", "seed"): "Seed for statement sampling (and validation rows when the data has no split column).",
    ("truthfulness", "probe_position"): "-1: the period; -2: the token before it \\[default: the one with the better validation accuracy].",
    ("truthfulness", "probe_layer"): "The paper's protocol: one layer for every model and topic (probes, cosine, intervention window) \\[default: each model's best layer on validation rows].",
    ("truthfulness", "site"): "Where the statements' activations are read: resid_post or resid_pre.",
    ("truthfulness", "suffix"): "Text after the statement in the few-shot prompt.",
    ("truthfulness", "label_words"): "The false and true answer words, comma-separated.",
    ("truthfulness", "token_budget"): "Padded tokens per batch of the intervention passes.",
    ("refusal", "site"): "resid_post or resid_pre: where directions are read and added.",
    ("refusal", "templates"): "A model's prompt template, LABEL=TEMPLATE (repeat): chat or a string with {text} \\[default: base 'User: {text}\\nAssistant:', post models chat].",
    ("refusal", "phrases"): "Refusal phrases, comma-separated, or @FILE with one per line; replaces the default list (the zoo's phrases plus 'I cannot', 'I'm sorry', 'As an AI', ...).",
    ("refusal", "max_new_tokens"): "Length of each greedy completion.",
    ("refusal", "n_val"): "Validation prompts per class for choosing the direction.",
    ("refusal", "n_eval"): "Test prompts per class for the refusal scores.",
    ("refusal", "skip_last"): "Fraction of last layers never chosen.",
    ("refusal", "generator"): "hf (transformers generate) or vllm (GPU only).",
    ("refusal", "batch_size"): "Prompts per forward / generate batch.",
    ("refusal", "text_column"): "Column holding the instruction, if not a usual name.",
    ("refusal", "store_dtype"): "Stored activations: float16 or float32.",
    ("refusal", "token_budget"): "Padded tokens per batch.",
    ("refusal", "seed"): "Seed for drawing missing splits.",
    ("refusal", "addition_scope"): "Where addition acts: prompt (the prompt's positions) or all (every position, generated tokens too; needed for vllm).",
    ("refusal", "addition_coefs"): "Addition coefficients tried on validation.",
    ("refusal", "addition_unit"): "Add the unit direction times the coefficient (the paper) instead of the difference of means.",
    ("refusal", "rerank"): "Best candidates by the logit score re-scored by validation completions (0: logit score only, coefficient 1).",
    ("refusal", "match"): "How a completion counts as a refusal: substring (a phrase anywhere) or prefix (the reply starts with one).",
    ("refusal", "kl_max"): "Drop candidates whose ablation moves harmless next-token distributions by KL above this (Arditi et al.: 0.1).",
    ("refusal", "select_all"): "Search and steer a direction also in models that do not refuse (their verdict stays inconclusive).",
    ("refusal", "n_bootstrap"): "Bootstrap resamples for the intervals.",
    ("refusal", "n_null"): "Seeded label shuffles: the null of the cross-model cosine.",
    ("refusal", "n_splits"): "Seeded split halves per model: the split-half reliability ceiling.",
}

# (study or "", role) -> help of a dataset-role flag.
DATASET_HELP: dict[tuple[str, str], str] = {
    ("", "statements"): "Statement CSVs (statement,label,topic[,split]) or a directory of truth_*.csv; repeat for several.",
    ("truthfulness", "shots"): "JSON {topic: \\[\\[statement, label], ...]} of few-shot examples \\[default: shots.json beside the statements, else drawn from the train split].",
    ("knowledge", "shots"): "Few-shot examples: a shots.json path, or auto (a shots.json beside --pairs).",
    ("", "pairs"): "CSV with columns true_statement, false_statement, true_answer, false_answer, topic.",
    ("", "harmful"): "Harmful instructions: CSV/JSON/JSONL (instruction or goal column, optional split).",
    ("", "harmless"): "Harmless instructions, same format.",
    ("", "texts"): "CSV / JSON / JSONL of texts.",
}
