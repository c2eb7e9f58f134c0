"""The default labeling prompt's text (DEFAULT_TEMPLATE in llm.py): the system and user
messages, with {placeholders} from llm.PLACEHOLDERS, and the answer prefix."""

SYSTEM = "You name the features of a language model. Answer with one JSON object."

USER = ("A feature of a language model fires on the tokens marked <<like this>> in these texts:\n{examples}\n\n"
        "The marked tokens: {top_tokens}. {nlp_summary}\n\n"
        "What do the marked tokens have in common? Reply with JSON with the keys \"name\" (at most five words), "
        "\"category\" (one of token, morphology, syntax, semantic, entity, format/code, position, other) "
        "and \"description\" (one sentence).")

ANSWER_PREFIX = '{"name": "'
"""Steers a small model into the JSON form (a local model's answer is made to begin with it)."""
