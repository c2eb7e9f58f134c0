"""The detection scorer's question, one per text; {what} is the label's name and description."""

DETECT_QUESTION = "Text: {text}\n\nDoes this text contain {what}? Answer Yes or No."
