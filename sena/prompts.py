"""The text prompts of one SENA round, in one place so the math and the words can be read side by side.

The released SENA code keeps its prompts inline; we keep the same roles (question, self-check, description,
short-answer suffixes, self-enhancement with and without a description). The embedded world's θ0 is trained on
exactly these strings, so a real LLaVA-1.5 and the world model see the same protocol.
"""

# Stage 1: self-questioning (SQ). One question about the image.
ASK_QUESTION = "Ask one question about the content of this image."

# Stage 1b: the self-check turn. The model sees its own question and keeps it only if the image answers it.
SELF_CHECK = (
    "Here is a question: {question} If this question can be answered from the image, repeat it unchanged. "
    "Otherwise write a new question that the image does answer. Answer in the form QUESTION: ..."
)

# Stage 2: short "describe the image" requests; one is drawn per question (the official code has 11).
DESCRIBE_PROMPTS = [
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
]

# Stage 3/4: suffixes that set the answer length for the two pair types.
DES_SUFFIX = " Answer in one short sentence."  # type "des": the description prompt
GEN_SUFFIX = " Answer the question using a single word or phrase."  # type "gen": the question prompt

# Stage 5: answer self-enhancement (SE). Accepted only when the output starts with IMPROVED_MARKER.
IMPROVED_MARKER = "Improved Answer:"
IMPROVE = (
    "Image description: {description} Question: {question} Current answer: {answer} "
    "Using the image and the description, give a more precise and concise answer. "
    "Answer in the form Improved Answer: ..."
)
# Used when the description is literally "Yes" (it carries no content, so it is left out).
IMPROVE_NO_DESCRIPTION = (
    "Question: {question} Current answer: {answer} "
    "Using the image, give a more precise and concise answer. Answer in the form Improved Answer: ..."
)
QUESTION_MARKER = "QUESTION:"


def improve_prompt(description, question, answer):
    """Stage 5's user turn. A description that is a bare "Yes" carries no content, so the released code leaves it
    out and asks with the image alone."""
    if description.strip() == "Yes":
        return IMPROVE_NO_DESCRIPTION.format(question=question, answer=answer)
    return IMPROVE.format(description=description, question=question, answer=answer)
