"""The paper's scoring done the way its released eval.py does it, with transformers: the reference the
engine's prompt construction and `score` are tested against. Written for these tests, step for step
with the official procedure: text truncation through the HF tokenizer, the prompt length measured with
its "{doc}" placeholder, right padding, full-vocabulary log-softmax, mean over the query tokens."""

from __future__ import annotations

import torch

TEMPLATE = "Document: {doc} Query:"


def paper_sequences(hf_tokenizer, pairs: list[dict], max_query_tokens=None, max_doc_tokens=None):
    """(input_ids, source_len) per pair, as the official code builds them."""

    def cut(text: str, n: int) -> str:
        return hf_tokenizer.decode(hf_tokenizer.encode(text, add_special_tokens=False)[:n])

    template_len = len(hf_tokenizer.encode(TEMPLATE))
    out = []
    for pair in pairs:
        query = pair["query"]
        if max_query_tokens is not None:
            query = cut(query, max_query_tokens)
        query = query.replace("[PAD]", "PAD")
        budget = max_doc_tokens
        if budget is None:
            budget = 512 - template_len - len(hf_tokenizer.encode(query)) - 10
        source = TEMPLATE.format(doc=cut(pair["document"], budget)).replace("[PAD]", "PAD")
        out.append((hf_tokenizer(source + query)["input_ids"], len(hf_tokenizer(source)["input_ids"])))
    return out


@torch.no_grad()
def paper_scores(hf_model, sequences: list[tuple[list[int], int]], batch_size: int = 8) -> list[float]:
    """Mean log-prob of the query tokens, from full logits of right-padded batches."""
    scores = []
    for i in range(0, len(sequences), batch_size):
        batch = sequences[i : i + batch_size]
        width = max(len(ids) for ids, _ in batch) - 1
        inputs = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full((len(batch), width), -100)
        for row, (ids, source_len) in enumerate(batch):
            inputs[row, : len(ids) - 1] = torch.tensor(ids[:-1])
            mask[row, : len(ids) - 1] = 1
            # labels[j] is the token after position j; the query tokens are ids[source_len:]
            labels[row, source_len - 1 : len(ids) - 1] = torch.tensor(ids[source_len:])
        logprobs = torch.log_softmax(hf_model(input_ids=inputs, attention_mask=mask).logits.float(), -1)
        picked = logprobs.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        keep = labels != -100
        scores += ((picked * keep).sum(-1) / keep.sum(-1)).tolist()
    return scores
