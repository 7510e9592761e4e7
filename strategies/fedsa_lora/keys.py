"""FedSA-LoRA's names: its client routine and what stays on a client."""

FEDSA_ROUTINE = "fedsa-lora"
# Instruction option: regular expression over adapter tensor names kept on each client.
OPT_PERSONAL = "personal"
# Default: every LoRA B factor (linear and embedding) is personal; A and the head are shared.
PERSONAL_B = r"\.lora_(B|embedding_B)(\.weight)?$"
# Instruction option: whether the client also sends its personal tensors (for the server's own model).
OPT_UPLOAD_PERSONAL = "upload_personal"
