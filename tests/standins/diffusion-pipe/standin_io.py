"""Files and texts for the diffusion-pipe stand-in (see train.py).

Real-format outputs: small safetensors files with each model type's LoRA key
names, DeepSpeed checkpoint folders (`global_step{N}/` + `latest`), DeepSpeed
log lines, and the CUDA OOM traceback as torch prints it.
"""
import json
import os
import struct
import sys
from datetime import datetime

sys.dont_write_bytecode = True  # keep the test tree free of __pycache__
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "_shared"))
from standin_common import bf16, write_safetensors  # noqa: E402


def ds_log(level, where, message):
    """A DeepSpeed logger line: `[date] [LEVEL] [file.py:line:func] message`."""
    now = datetime.now().strftime('%Y-%m-%d %H:%M:%S,%f')[:-3]
    print(f'[{now}] [{level}] [{where}] {message}', flush=True)


# --- LoRA weights ------------------------------------------------------------

# Two blocks per model, named the way each save format names them.
LORA_MODULES = {
    'flux': ['transformer.transformer_blocks.{i}.attn.to_q'],
    'qwen_image': ['diffusion_model.transformer_blocks.{i}.attn.to_q'],
    'wan': ['diffusion_model.blocks.{i}.self_attn.q'],
    'z_image': ['diffusion_model.layers.{i}.attention.qkv'],
    'sdxl': ['lora_unet_down_blocks_1_attentions_0_transformer_blocks_{i}_attn1_to_q'],
}
WEIGHTS_FILE = {
    'flux': 'pytorch_lora_weights.safetensors',
    'sdxl': 'lora.safetensors',
}
BLOCKS = 2
IN_FEATURES = 8


def weights_file(model_type):
    return WEIGHTS_FILE.get(model_type, 'adapter_model.safetensors')


def lora_shapes(model_type, rank):
    """(name, shape) of every trained tensor, in state order."""
    shapes = []
    for template in LORA_MODULES[model_type]:
        for i in range(BLOCKS):
            base = template.format(i=i)
            if model_type == 'sdxl':
                shapes.append((f'{base}.lora_down.weight', [rank, IN_FEATURES]))
                shapes.append((f'{base}.lora_up.weight', [IN_FEATURES, rank]))
            else:
                shapes.append((f'{base}.lora_A.weight', [rank, IN_FEATURES]))
                shapes.append((f'{base}.lora_B.weight', [IN_FEATURES, rank]))
    return shapes


def state_size(model_type, rank):
    return sum(a * b for _, (a, b) in lora_shapes(model_type, rank))


def save_adapter(save_dir, model_type, rank, state):
    """The LoRA as diffusion-pipe saves it for this model type."""
    tensors = {}
    at = 0
    for name, (a, b) in lora_shapes(model_type, rank):
        tensors[name] = ([a, b], bf16(state[at:at + a * b]))
        at += a * b
    if model_type == 'sdxl':
        for template in LORA_MODULES['sdxl']:
            for i in range(BLOCKS):
                tensors[f'{template.format(i=i)}.alpha'] = ([], bf16([float(rank)]))
    write_safetensors(os.path.join(save_dir, weights_file(model_type)), tensors, {'format': 'pt'})
    if model_type not in WEIGHTS_FILE:
        config = {
            'peft_type': 'LORA',
            'r': rank,
            'lora_alpha': rank,
            'lora_dropout': 0.0,
            'target_modules': sorted({n.split('.')[-3] for n, _ in lora_shapes(model_type, rank)}),
        }
        with open(os.path.join(save_dir, 'adapter_config.json'), 'w') as f:
            json.dump(config, f, indent=2)


# --- DeepSpeed checkpoints ---------------------------------------------------

CLIENT_STATE_FILE = 'mp_rank_00_model_states.pt'


def save_checkpoint(run_dir, global_steps, client_state, state):
    """`engine.save_checkpoint(run_dir, client_state=…, save_latest=True)`:
    per-layer files, the engine state, and `latest` last."""
    tag = f'global_step{global_steps}'
    ckpt = os.path.join(run_dir, tag)
    os.makedirs(ckpt, exist_ok=True)
    ds_log('INFO', 'torch_checkpoint_engine.py:21:create', f'[Torch] Checkpoint {tag} is about to be saved!')
    for layer in range(1, BLOCKS + 1):
        with open(os.path.join(ckpt, f'layer_{layer:02d}-model_states.pt'), 'wb') as f:
            f.write(struct.pack('<I', layer) * 16)
    path = os.path.join(ckpt, CLIENT_STATE_FILE)
    ds_log('INFO', 'logging.py:107:log_dist', f'[Rank 0] Saving model checkpoint: {path}')
    with open(path, 'w') as f:
        json.dump({'global_steps': global_steps, 'client_state': client_state, 'lora': state}, f)
    with open(os.path.join(run_dir, 'latest'), 'w') as f:
        f.write(tag)


def load_checkpoint(run_dir):
    """`engine.load_checkpoint(run_dir)`: the tag `latest` names, or (None, None)."""
    latest = os.path.join(run_dir, 'latest')
    if not os.path.isfile(latest):
        ds_log('WARNING', 'engine.py:3046:load_checkpoint',
               f'Unable to find latest file at {latest}, if trying to load latest checkpoint please ensure '
               'this file exists or pass an explicit checkpoint tag when loading a checkpoint.')
        return None, None
    with open(latest) as f:
        tag = f.read().strip()
    path = os.path.join(run_dir, tag, CLIENT_STATE_FILE)
    ds_log('INFO', 'torch_checkpoint_engine.py:27:load', f'[Torch] Loading checkpoint from {path}...')
    with open(path) as f:
        saved = json.load(f)
    return path, saved


# --- faults ------------------------------------------------------------------

def print_oom(script):
    """What an uncaught torch.OutOfMemoryError in the train step prints."""
    site = '/usr/local/lib/python3.11/dist-packages'
    lines = [
        'Traceback (most recent call last):',
        f'  File "{script}", line 871, in <module>',
        '    loss = model_engine.train_batch(iterator).item()',
        '           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^',
        f'  File "{site}/deepspeed/runtime/pipe/engine.py", line 389, in train_batch',
        '    self._exec_schedule(sched)',
        f'  File "{site}/deepspeed/runtime/pipe/engine.py", line 1433, in _exec_schedule',
        '    self._exec_instr(**cmd.kwargs)',
        f'  File "{site}/deepspeed/runtime/pipe/engine.py", line 1091, in _exec_backward_pass',
        '    torch.autograd.backward(tensors=(outputs, ), grad_tensors=(grad_tensors, ))',
        f'  File "{site}/torch/autograd/__init__.py", line 353, in backward',
        '    _engine_run_backward(',
        f'  File "{site}/torch/autograd/graph.py", line 824, in _engine_run_backward',
        '    return Variable._execution_engine.run_backward(  # Calls into the C++ engine to run the backward pass',
        '           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^',
        'torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.22 GiB. GPU 0 has a total capacity of '
        '23.55 GiB of which 1.02 GiB is free. Including non-PyTorch memory, this process has 22.51 GiB memory in use. '
        'Of the allocated memory 21.87 GiB is allocated by PyTorch, and 198.35 MiB is reserved by PyTorch but '
        'unallocated. If reserved but unallocated memory is large try setting '
        'PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for Memory '
        'Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)',
    ]
    print('\n'.join(lines), file=sys.stderr, flush=True)
