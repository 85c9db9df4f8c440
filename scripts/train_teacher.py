"""Train the small English→German MarianMT teacher that the default `config.json` compresses.

It is trained from scratch, with its own joint sentencepiece vocabulary, on Tatoeba pairs (see
`data/tatoeba_en_de/README.md` for provenance and licence). By default it reads the pairs shipped
in `data/tatoeba_en_de/` (`train.csv`, 20,000 pairs; `eval.csv`, 1,000) and writes the model to
`outputs/teacher-en-de/`, so it runs on a fresh clone and never replaces the shipped teacher.

The shipped teacher in `models/teacher-en-de/` was trained on the full corpus, 164,822 training
and 2,000 dev pairs (`train.csv`, `dev.csv`), which is not in the repository: on the project's
machines it is `/work/shared/data/tatoeba_en_de/`; where it comes from and how it was split is in
`data/tatoeba_en_de/README.md`. To reproduce the shipped teacher and the
data subset the default job uses (59 min on one CPU core):

    python -m scripts.train_teacher --data-dir /work/shared/data/tatoeba_en_de --out models/teacher-en-de
    python -m scripts.train_teacher --epochs 1 --limit 5000 --vocab-size 1000 --out /tmp/t   # a quick try

Outputs (written atomically: a temporary folder, then a rename):
    --out          model.safetensors, config.json, tokenizer files, training_info.json
    --subset-dir   train.csv (the first 20k training pairs), eval.csv (the first 1k dev pairs); skipped
                   when it is --data-dir itself (the shipped pairs are that subset already)
"""

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent

import sentencepiece as spm  # noqa: E402
import torch  # noqa: E402
from transformers import MarianConfig, MarianMTModel, MarianTokenizer  # noqa: E402

from mdcompress.data import read_pairs, write_pairs  # noqa: E402
from mdcompress.evaluation import corpus_scores  # noqa: E402
from mdcompress.files import replace_folder  # noqa: E402
from mdcompress.translate import translate  # noqa: E402


def build_tokenizer(pairs, work_dir, vocab_size, seed, hard_vocab_limit=True):
    """A joint (English + German) unigram sentencepiece model, laid out like OPUS-MT's vocab:
    `</s>` = 0, `<unk>` = 1, the pieces, `<pad>` last. ``hard_vocab_limit=False`` lets a toy corpus
    end up with fewer pieces than asked for."""
    spm.set_random_generator_seed(seed)
    text = work_dir / "spm_input.txt"
    text.write_text("\n".join(s for pair in pairs for s in pair) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(work_dir / "spm"), vocab_size=vocab_size - 2,
        model_type="unigram", character_coverage=1.0, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
        input_sentence_size=400_000, shuffle_input_sentence=True, seed_sentencepiece_size=200_000,
        num_threads=os.cpu_count() or 1, minloglevel=2, hard_vocab_limit=hard_vocab_limit,
    )
    sp = spm.SentencePieceProcessor(model_file=str(work_dir / "spm.model"))
    vocab = {"</s>": 0, "<unk>": 1}
    for i in range(sp.get_piece_size()):
        vocab.setdefault(sp.id_to_piece(i), len(vocab))
    vocab["<pad>"] = len(vocab)
    (work_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    spm_path = str(work_dir / "spm.model")
    return MarianTokenizer(source_spm=spm_path, target_spm=spm_path, vocab=str(work_dir / "vocab.json"))


def make_batches(lengths, batch_size, rng):
    """Length-bucketed batches in random order: sort within large random chunks, then cut."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    chunk = batch_size * 100
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: lengths[i])
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(features, idx, pad_id):
    def pad(key, value):
        seqs = [features[key][i] for i in idx]
        out = torch.full((len(seqs), max(map(len, seqs))), value, dtype=torch.long)
        for row, seq in enumerate(seqs):
            out[row, :len(seq)] = torch.tensor(seq)
        return out

    input_ids = pad("input_ids", pad_id)
    return {"input_ids": input_ids, "attention_mask": (input_ids != pad_id).long(), "labels": pad("labels", -100)}


def bleu(model, tokenizer, pairs, batch_size=128):
    """(BLEU, chrF) of greedy translations of the pairs' sources, scored as the compression run scores."""
    hypotheses = translate(model, tokenizer, [s for s, _ in pairs], batch_size=batch_size, max_new_tokens=128)
    scores = corpus_scores(hypotheses, [t for _, t in pairs])
    return scores["bleu"], scores["chrf"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(REPO / "data" / "tatoeba_en_de"),
                    help="a folder with train.csv and dev.csv (or eval.csv); default: the shipped 20,000 + 1,000 pairs")
    ap.add_argument("--out", default=str(REPO / "outputs" / "teacher-en-de"),
                    help="where the model goes (the shipped teacher is models/teacher-en-de)")
    ap.add_argument("--subset-dir", default=str(REPO / "data" / "tatoeba_en_de"),
                    help="where the default job's data subset is written ('' to skip)")
    ap.add_argument("--subset-train", type=int, default=20_000)
    ap.add_argument("--subset-eval", type=int, default=1_000)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N training pairs")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=3, help="encoder layers = decoder layers")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=800)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 is robust when other jobs share the cores)")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    data_dir = Path(args.data_dir)
    train = read_pairs(data_dir / "train.csv")[:args.limit]
    dev = read_pairs(data_dir / "dev.csv" if (data_dir / "dev.csv").exists() else data_dir / "eval.csv")
    if args.subset_dir and Path(args.subset_dir).resolve() != data_dir.resolve():
        write_pairs(Path(args.subset_dir) / "train.csv", train[:args.subset_train])
        write_pairs(Path(args.subset_dir) / "eval.csv", dev[:args.subset_eval])

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".tmp-teacher-", dir=out.parent))
    tokenizer = build_tokenizer(train, work, args.vocab_size, args.seed)
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id

    t0 = time.time()
    features = tokenizer([s for s, _ in train], text_target=[t for _, t in train],
                         truncation=True, max_length=args.max_length)
    print(f"tokenized {len(train):,} pairs in {time.time() - t0:.0f}s; vocab {len(tokenizer)}", flush=True)

    config = MarianConfig(
        vocab_size=len(tokenizer), d_model=args.d_model, encoder_layers=args.layers, decoder_layers=args.layers,
        encoder_attention_heads=args.heads, decoder_attention_heads=args.heads,
        encoder_ffn_dim=args.ffn, decoder_ffn_dim=args.ffn, max_position_embeddings=256,
        dropout=0.1, attention_dropout=0.0, activation_dropout=0.0, activation_function="swish",
        scale_embedding=True, share_encoder_decoder_embeddings=True, tie_word_embeddings=True,
        pad_token_id=pad_id, eos_token_id=eos_id, decoder_start_token_id=pad_id, forced_eos_token_id=eos_id,
    )
    model = MarianMTModel(config)
    # Marian's convention, which converted OPUS-MT checkpoints follow and CTranslate2 relies on: the
    # <pad> row of the (tied) embedding is zero, so decoding starts from a zero vector. The tied
    # output projection would otherwise train that row; it is reset after every step.
    pad_row = model.get_input_embeddings().weight
    with torch.no_grad():
        pad_row[pad_id].zero_()
    model.generation_config.num_beams = 1
    model.generation_config.bad_words_ids = [[pad_id]]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    lengths = [len(x) for x in features["input_ids"]]
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total = steps_per_epoch * args.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / args.warmup, max(0.0, (total - s) / max(1, total - args.warmup))))
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100, label_smoothing=args.label_smoothing)

    history = []
    step = 0
    t0 = time.time()
    for epoch in range(1, args.epochs + 1):
        model.train()
        running = 0.0
        for i, idx in enumerate(make_batches(lengths, args.batch_size, rng)):
            batch = collate(features, idx, pad_id)
            logits = model(**batch).logits  # (B, T, V)
            loss = loss_fn(logits.view(-1, logits.size(-1)), batch["labels"].view(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            with torch.no_grad():
                pad_row[pad_id].zero_()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            running += loss.item()
            if step % 200 == 0:
                print(f"epoch {epoch} step {step}/{total} loss {running / (i + 1):.3f} "
                      f"{(time.time() - t0) / step:.3f}s/step", flush=True)
        dev_bleu, dev_chrf = bleu(model, tokenizer, dev[:500])
        history.append({"epoch": epoch, "train_loss": running / steps_per_epoch, "dev500_bleu": dev_bleu})
        print(f"epoch {epoch}: loss {running / steps_per_epoch:.3f}, BLEU {dev_bleu:.1f} on 500 dev pairs, "
              f"{(time.time() - t0) / 60:.1f} min", flush=True)

    train_minutes = (time.time() - t0) / 60
    eval_bleu, eval_chrf = bleu(model, tokenizer, dev[:args.subset_eval])
    dev_bleu, dev_chrf = bleu(model, tokenizer, dev)
    print(f"final: BLEU {eval_bleu:.2f} / chrF {eval_chrf:.2f} on the {args.subset_eval} eval pairs; "
          f"BLEU {dev_bleu:.2f} / chrF {dev_chrf:.2f} on all {len(dev)} dev pairs (greedy)", flush=True)

    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    info = {"args": vars(args), "parameters": n_params, "train_pairs": len(train), "train_minutes": round(train_minutes, 1),
            "history": history, "greedy_eval1k": {"bleu": round(eval_bleu, 2), "chrf": round(eval_chrf, 2)},
            "greedy_dev2k": {"bleu": round(dev_bleu, 2), "chrf": round(dev_chrf, 2)},
            "torch": torch.__version__}
    (work / "model" / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    replace_folder(work / "model", out)
    shutil.rmtree(work)
    print(f"saved {out}")


if __name__ == "__main__":
    sys.exit(main())
