"""The names of the files in the folders this toolkit reads and writes, once. A model folder:

    HF:         model.safetensors or pytorch_model.bin, or shards model-00001-of-00003.safetensors … with
                model.safetensors.index.json / pytorch_model.bin.index.json
    MindSpore:  mindspore_model.ckpt or mindspore_model.safetensors
    both:       config.json, the tokenizer files, manifest.json (glm2_core.outputs)

A glm2-finetune run folder (converters/runs.py describes it): train_log.jsonl beside checkpoint/,
checkpoint_network/ and checkpoint_trainable/, strategy/ (distributed runs), config.json and the tokenizer files;
glm2-merge-shards writes the strategy/ of its shards too.
"""
CONFIG = "config.json"
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_FILES = (TOKENIZER_MODEL, TOKENIZER_CONFIG, "special_tokens_map.json", "tokenization_chatglm.py")
HF_WEIGHTS = {"safetensors": "model.safetensors", "bin": "pytorch_model.bin"}  # one file, or the stem of shards
INDEX_FILES = {f"{name}.index.json": fmt for fmt, name in HF_WEIGHTS.items()}
MS_WEIGHTS = {"ckpt": "mindspore_model.ckpt", "safetensors": "mindspore_model.safetensors"}
TRAIN_LOG = "train_log.jsonl"
TRAINING, NETWORK, TRAINABLE = "checkpoint", "checkpoint_network", "checkpoint_trainable"  # a run's checkpoint folders
STRATEGY = "strategy"
RUN_ENTRIES = (TRAIN_LOG, TRAINING, NETWORK, TRAINABLE, STRATEGY)  # a run's own; its model files vary
