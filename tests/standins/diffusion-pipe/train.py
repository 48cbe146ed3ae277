#!/usr/bin/env python3
"""Stand-in for tdrussell/diffusion-pipe's `train.py`, run by the `deepspeed`
launcher like the real one. No GPU, no torch: it follows the real script's
order and prints its lines, writes its layout and honours its flags.

- Arguments as the real one (`--local_rank`, `--deepspeed`, `--config`,
  `--resume_from_checkpoint [RUN_DIR]`, `--master_port`, …).
- The rendezvous port: like the real `distributed_init`, it takes
  `--master_port` (default 29500) over the MASTER_PORT the launcher exported,
  and binds it for the whole run as torch.distributed's TCPStore does in
  `deepspeed.init_distributed`; a port already taken fails with the
  DistNetworkError torch raises (EADDRINUSE). It binds on a loopback address
  standing for the machine: STANDIN_LOOPBACK when set, else one derived from
  the pid of the process that started the launcher (the worker), so runs
  started by one worker contend for ports as on one machine while separate
  test processes do not.
- Validates like the real one: `set_config_defaults` (the bare assert for a
  missing `save_every_n_*` key, the NotImplementedError for an [adapter]
  alpha, KeyError for a dtype not in DTYPE_MAP), the model type dispatch, the
  model paths it was given (and the `merge_adapters` files), the optimizer's
  keyword arguments for the built-in optimizer types, the dataset folder and
  `min_ar`/`max_ar`/`num_ar_buckets`; clips (counted with ffprobe, as the
  real one counts them by decoding) go to the longest `frame_buckets` entry
  not longer than they are, or are skipped as too short, and a line
  `stand-in: video <file> frames=N bucket=B` says where each went.
- Z-Image-Turbo without `merge_adapters`: see `check_turbo_adapter`.
- A fresh run creates `output_dir/<UTC %Y%m%d_%H-%M-%S>/` and copies both
  TOMLs there; `--resume_from_checkpoint` with no value uses the newest run
  folder, with a value `output_dir/<value>`, and loads the tag in `latest`.
- Per step DeepSpeed's `steps: N loss: … iter time (s): … samples/sec: …`;
  `save_every_n_*` writes `step{N}/` or `epoch{N}/` with the model type's
  weights file; `checkpoint_every_n_minutes`/`_epochs` write
  `global_step{N}/` and then `latest`; the files `save` and `save_quit` in
  the run folder are checked every step; the end writes a checkpoint and the
  final model, then prints `TRAINING COMPLETE!`.

Environment: STANDIN_STEP_SECONDS (sleep per step, default 0.02),
STANDIN_FAULT = oom@N | hang@N | exit0@N | crash@N (at absolute step N),
STANDIN_NAN_FROM = N (loss prints as nan from step N on).
"""
import argparse
import errno
import glob
import json
import math
import os
import shutil
import socket
import sys
import time
import tomllib
from datetime import datetime, timezone

# Leave no __pycache__ in the source tree.
sys.dont_write_bytecode = True
import standin_io as dsio  # noqa: E402 (puts ../_shared on sys.path)
import standin_common  # noqa: E402
from standin_common import HFValidationError, fault  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument('--config', help='Path to TOML configuration file.')
parser.add_argument('--local_rank', type=int, default=-1, help='local rank passed from distributed launcher')
parser.add_argument('--resume_from_checkpoint', nargs='?', const=True, default=None)
parser.add_argument('--reset_dataloader', action='store_true')
parser.add_argument('--reset_optimizer', action='store_true')
parser.add_argument('--reset_optimizer_params', action='store_true')
parser.add_argument('--regenerate_cache', action='store_true')
parser.add_argument('--cache_only', action='store_true')
parser.add_argument('--trust_cache', action='store_true')
parser.add_argument('--i_know_what_i_am_doing', action='store_true')
parser.add_argument('--master_port', type=int, default=29500)
parser.add_argument('--dump_dataset', default=None)
# deepspeed.add_config_arguments
parser.add_argument('--deepspeed', default=False, action='store_true')
parser.add_argument('--deepspeed_config', default=None, type=str)
args = parser.parse_args()

DTYPE_MAP = {'float32', 'float16', 'bfloat16', 'float8', 'float8_e4m3fn', 'float8_e5m2'}
MODEL_TYPES = ('flux', 'sdxl', 'wan', 'qwen_image', 'z_image', 'ltx-video', 'hunyuan-video', 'chroma', 'lumina_2')
SKIPPED_SUFFIXES = ('.txt', '.npz', '.json', '.parquet', '.bak', '.db')
# imageio's video extensions that matter here (the real one reads them all).
VIDEO_SUFFIXES = ('.mp4', '.webm', '.mov', '.mkv', '.avi')


def count_frames(path):
    """Frames of a clip, counted by decoding it as the real one does through
    imageio (here with ffprobe); None, with the real warning, when it cannot
    be opened."""
    frames = standin_common.count_frames(path)
    if frames is None:
        print(f'Media file {path} could not be opened. Skipping.')
    return frames


def missing(path):
    return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)


def dtype(name):
    """DTYPE_MAP[name]: a KeyError for a name it does not hold."""
    if name not in DTYPE_MAP:
        raise KeyError(name)
    return name


def set_config_defaults(config):
    # Force the user to set this. If we made it a default of 1, it might use a lot of disk space.
    assert 'save_every_n_epochs' in config or 'save_every_n_steps' in config or 'save_every_n_examples' in config

    config.setdefault('pipeline_stages', 1)
    config.setdefault('activation_checkpointing', False)
    config.setdefault('warmup_steps', 0)
    if 'save_dtype' in config:
        dtype(config['save_dtype'])
    model_config = config['model']
    model_dtype_str = dtype(model_config['dtype'])
    for key in ('transformer_dtype', 'diffusion_model_dtype'):
        if value := model_config.get(key, None):
            dtype(value)
    if 'adapter' in config:
        adapter_config = config['adapter']
        adapter_type = adapter_config['type']
        if 'alpha' in adapter_config:
            raise NotImplementedError(
                'This script forces alpha=rank to make the saved adapter format simpler and more predictable with downstream inference programs. Please remove alpha from the config.'
            )
        adapter_config['alpha'] = adapter_config['rank']
        adapter_config.setdefault('dtype', model_dtype_str)
        dtype(adapter_config['dtype'])
        if adapter_type not in ('lora', 'lokr'):
            raise NotImplementedError(f'Adapter type {adapter_type} is not implemented')
    config.setdefault('logging_steps', 1)


class DistNetworkError(RuntimeError):
    """torch.distributed.DistNetworkError, as its traceback names it."""


DistNetworkError.__module__ = 'torch.distributed'


def loopback_host():
    """The loopback address standing for this machine (see the module doc)."""
    if host := os.environ.get('STANDIN_LOOPBACK'):
        return host
    # The launcher's parent: field 4 of /proc/<launcher pid>/stat.
    launcher = os.getppid()
    try:
        with open(f'/proc/{launcher}/stat') as f:
            starter = int(f.read().rsplit(')', 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        starter = launcher
    n = (1 << 22) + (starter & ((1 << 22) - 1))
    return f'127.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}'


def init_distributed(master_port):
    """The TCPStore server rank 0 starts: it holds the port until exit."""
    store = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        store.bind((loopback_host(), master_port))
        store.listen()
    except OSError as e:
        store.close()
        raise DistNetworkError(
            'The server socket has failed to listen on any local network address. '
            f'port: {master_port}, useIpv6: false, code: -98, name: EADDRINUSE, message: {e.strerror}'
        ) from None
    return store


def check_turbo_adapter(model_config):
    """Z-Image-Turbo needs its de-distill adapter merged (`merge_adapters`).

    The real trainer cannot tell Turbo from the base model and does not fail:
    without the adapter it trains the LoRA straight on the distilled weights,
    which breaks Turbo's few-step distillation, so the LoRA is wrong at
    inference. The stand-in fails instead, so that a test sees the entry
    missing. Turbo is told by its ComfyUI file name (`z_image_turbo_*`).
    """
    name = os.path.basename(model_config['diffusion_model']).lower()
    if 'turbo' in name and not model_config.get('merge_adapters'):
        raise AssertionError(
            f'stand-in: {name} is Z-Image-Turbo but [model] has no merge_adapters: upstream would train '
            'on the distilled weights and break them; merge ostris/zimage_turbo_training_adapter')


def diffusers_folder(path, subfolder=None):
    """What diffusers' from_pretrained does with a local path."""
    folder = os.path.join(path, subfolder) if subfolder else path
    if not os.path.isdir(folder):
        raise HFValidationError(
            f"Repo id must be in the form 'repo_name' or 'namespace/repo_name': '{folder}'. Use `repo_type` argument if needed.")
    wanted = 'config.json' if subfolder else 'model_index.json'
    if not os.path.isfile(os.path.join(folder, wanted)):
        raise OSError(f'Error no file named {wanted} found in directory {folder}.')


def single_file(path):
    """safetensors/comfy loading one file."""
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    if not os.path.isfile(path):
        raise missing(path)


def load_model(model_config):
    """The model constructors: each reads the paths it was given."""
    model_type = model_config['type']
    if model_type == 'flux':
        if transformer_path := model_config.get('transformer_path', None):
            print(f'Overriding transformer using {transformer_path}')
            single_file(transformer_path)
        else:
            diffusers_folder(model_config['diffusers_path'], 'transformer')
        diffusers_folder(model_config['diffusers_path'])
    elif model_type == 'sdxl':
        single_file(model_config['checkpoint_path'])
    elif model_type == 'wan':
        config_json = os.path.join(model_config['ckpt_path'], 'config.json')
        if not os.path.isfile(config_json):
            raise missing(config_json)
    elif model_type == 'qwen_image':
        if 'diffusers_path' in model_config:
            diffusers_folder(model_config['diffusers_path'])
        else:
            for key in ('transformer_path', 'text_encoder_path', 'vae_path'):
                single_file(model_config[key])
    elif model_type == 'z_image':
        single_file(model_config['vae'])
        for te in model_config['text_encoders']:
            single_file(te['path'])
        single_file(model_config['diffusion_model'])
        # ComfyPipeline.load_diffusion_model: each entry is one LoRA file.
        for adapter_path in model_config.get('merge_adapters', []):
            print(f'Merging adapter {adapter_path}')
            single_file(adapter_path)
        check_turbo_adapter(model_config)
    elif model_type in MODEL_TYPES:
        pass
    else:
        raise NotImplementedError(f'Model type {model_type} is not implemented')
    return model_type


def load_dataset(dataset_config, model_type):
    """Examples per epoch, after the checks DirectoryDataset makes."""
    resolutions = dataset_config.get('resolutions', [])
    if len(resolutions) > 3 and not args.i_know_what_i_am_doing:
        print('WARNING: You have set a lot of resolutions in the dataset config. Please read the comments in the example dataset.toml file,'
              ' and make sure you understand what this setting does. If you still want to proceed with the current configuration,'
              ' run the script with the --i_know_what_i_am_doing flag.')
        sys.exit(0)
    examples = 0
    for directory in dataset_config['directory']:
        path = directory['path']
        if not os.path.exists(path) or not os.path.isdir(path):
            raise RuntimeError(f'Invalid path: {path}')
        if directory.get('enable_ar_bucket', dataset_config.get('enable_ar_bucket', False)):
            if not directory.get('ar_buckets', dataset_config.get('ar_buckets', None)):
                for key in ('min_ar', 'max_ar', 'num_ar_buckets'):
                    directory.get(key, dataset_config[key])
        num_repeats = directory.get('num_repeats', 1)
        if num_repeats <= 0:
            raise ValueError(f'num_repeats must be >0, was {num_repeats}')
        cache_dir = os.path.join(path, 'cache', model_type)
        os.makedirs(cache_dir, exist_ok=True)
        files = sorted(f for f in glob.glob(os.path.join(path, '*')) if os.path.isfile(f)
                       and not f.endswith(SKIPPED_SUFFIXES))
        assert len(files) > 0, f'Directory {path} had no images/videos!'
        skip_empty = directory.get('skip_empty_caption', dataset_config.get('skip_empty_caption', True))
        frame_buckets = sorted(set(directory.get('frame_buckets', dataset_config.get('frame_buckets', [1]))) | {1})
        buckets = {}
        for f in files:
            if not (os.path.exists(os.path.splitext(f)[0] + '.txt') or not skip_empty):
                print(f'Cound not find caption for {f}. Skipping image.')
                continue
            frames = 1
            if os.path.splitext(f)[1].lower() in VIDEO_SUFFIXES:
                frames = count_frames(f)
                if frames is None:
                    continue
            # _find_closest_ar_bucket: the longest bucket not longer than
            # the clip; a video never goes to the image bucket.
            fitting = [b for b in frame_buckets if b <= frames]
            if not fitting or (frames > 1 and fitting[-1] == 1):
                print(f'video with frames={frames} is being skipped because it is too short')
                continue
            bucket = fitting[-1]
            if frames > 1:
                # Not a line of the real trainer: says which clip went where.
                print(f'stand-in: video {os.path.basename(f)} frames={frames} bucket={bucket}')
            buckets[bucket] = buckets.get(bucket, 0) + 1
        for bucket in sorted(buckets):
            print(f'caching latents: (1.0, {bucket})')
            print(f'caching text embeddings: (1.0, {bucket})')
        examples += sum(buckets.values()) * num_repeats * max(len(resolutions), 1)
    return examples


# The keyword arguments of the classes `get_optimizer` builds for its
# built-in types (torch, bitsandbytes, optimi, torchao and the repository's own
# optimizers/); any other type is a pytorch_optimizer class, not checked.
ADAM = {'lr', 'betas', 'eps', 'weight_decay', 'amsgrad', 'foreach', 'maximize', 'capturable', 'differentiable', 'fused'}
BNB_ADAM = {'lr', 'betas', 'eps', 'weight_decay', 'amsgrad', 'optim_bits', 'args', 'min_8bit_size',
            'percentile_clipping', 'block_wise', 'is_paged'}
OPTIMI = {'lr', 'betas', 'weight_decay', 'eps', 'decouple_lr', 'max_lr', 'kahan_sum', 'foreach', 'gradient_release'}
OPTIMIZER_KWARGS = {
    'adamw': ('AdamW', ADAM),
    'adamw8bit': ('AdamW8bit', BNB_ADAM),
    'adamw_optimi': ('AdamW', OPTIMI),
    'stableadamw': ('StableAdamW', OPTIMI),
    'sgd': ('SGD', {'lr', 'momentum', 'dampening', 'weight_decay', 'nesterov', 'maximize', 'foreach',
                    'differentiable', 'fused'}),
    'adamw8bitkahan': ('AdamW8bitKahan', BNB_ADAM | {'stabilize'}),
    'offload': ('AdamW', ADAM | {'offload_gradients'}),
    'automagic': ('Automagic', {'lr', 'min_lr', 'max_lr', 'lr_bump', 'eps', 'clip_threshold', 'beta2',
                                'weight_decay', 'do_paramiter_swapping', 'paramiter_swapping_factor'}),
}


def get_optimizer(optim_config):
    """What constructing the optimizer raises for arguments it does not take."""
    optim_type = optim_config['type']
    kwargs = {k: v for k, v in optim_config.items() if k not in ['type', 'gradient_release']}
    known = OPTIMIZER_KWARGS.get(optim_type.lower())
    if known is None:
        return
    klass, accepted = known
    for key in kwargs:
        if key not in accepted:
            raise TypeError(f"{klass}.__init__() got an unexpected keyword argument '{key}'")
    # Automagic indexes its eps pair (eps[0], eps[1]) on the first step.
    if optim_type.lower() == 'automagic' and not isinstance(kwargs.get('eps', (1e-30, 1e-3)), (list, tuple)):
        raise TypeError(f"'{type(kwargs['eps']).__name__}' object is not subscriptable")


def get_most_recent_run_dir(output_dir):
    return list(sorted(glob.glob(os.path.join(output_dir, '*'))))[-1]


class Loader:
    """PipelineDataLoader's epoch/position bookkeeping."""

    def __init__(self, micro_batches_per_epoch):
        self.per_epoch = micro_batches_per_epoch
        self.epoch = 1
        self.position = 0

    def next_micro_batch(self):
        index = self.position
        self.position += 1
        if self.position >= self.per_epoch:
            self.position = 0
            self.epoch += 1
        return index

    def state_dict(self):
        return {'epoch': self.epoch, 'position': self.position}

    def load_state_dict(self, state):
        self.epoch = state['epoch']
        self.position = state['position']


class Trainer:
    def __init__(self, config, model_type, run_dir, loader, global_batch):
        self.config = config
        self.model_type = model_type
        self.run_dir = run_dir
        self.loader = loader
        self.global_batch = global_batch
        self.rank = config['adapter']['rank']
        self.state = [0.0] * dsio.state_size(model_type, self.rank)
        self.last_checkpoint_time = None

    def train_batch(self, step):
        gas = self.config.get('gradient_accumulation_steps', 1)
        # The update depends on the data position and epoch, so a resume
        # that restores them wrongly ends with different weights.
        seen = [self.loader.next_micro_batch() for _ in range(gas)]
        drift = sum(seen) + 1 + 0.5 * self.loader.epoch
        self.state = [w * 0.99 + 0.001 * ((i % 7) - 3) * drift / (step + 1) for i, w in enumerate(self.state)]
        nan_from = int(os.environ.get('STANDIN_NAN_FROM', '0') or 0)
        return math.nan if nan_from and step >= nan_from else 0.05 + 0.5 * math.exp(-step / 40)

    def need_to_checkpoint(self, epoch=None):
        if epoch is not None:
            if 'checkpoint_every_n_epochs' in self.config and epoch % self.config['checkpoint_every_n_epochs'] == 0:
                self.last_checkpoint_time = time.time()
                return True
            return False
        if 'checkpoint_every_n_minutes' not in self.config:
            return False
        now = time.time()
        if self.last_checkpoint_time is None:
            self.last_checkpoint_time = now
        elif (now - self.last_checkpoint_time) / 60 > self.config['checkpoint_every_n_minutes']:
            self.last_checkpoint_time = now
            return True
        return False

    def save_model(self, name):
        print(f'Saving model to directory {name}', flush=True)
        save_dir = os.path.join(self.run_dir, name)
        os.makedirs(save_dir, exist_ok=False)
        dsio.save_adapter(save_dir, self.model_type, self.rank, self.state)
        shutil.copy(args.config, save_dir)

    def save_checkpoint(self, step, examples):
        client_state = {'step': step, 'examples': examples, 'custom_loader': self.loader.state_dict()}
        dsio.save_checkpoint(self.run_dir, step, client_state, self.state)

    def process_epoch(self, epoch, step, examples):
        checkpointed, saved = False, False
        if self.loader.epoch != epoch:
            if self.need_to_checkpoint(epoch):
                self.save_checkpoint(step, examples)
                checkpointed = True
            if 'save_every_n_epochs' in self.config and epoch % self.config['save_every_n_epochs'] == 0:
                self.save_model(f'epoch{epoch}')
                saved = True
            epoch = self.loader.epoch
            if epoch > self.config['epochs']:
                return None, checkpointed, saved
            print(f'Started new epoch: {epoch}', flush=True)
        return epoch, checkpointed, saved

    def process_step(self, step, examples):
        checkpointed, saved = False, False
        should_save = should_quit = False
        save_file = os.path.join(self.run_dir, 'save')
        save_quit_file = os.path.join(self.run_dir, 'save_quit')
        if os.path.isfile(save_file):
            should_save = True
            os.remove(save_file)
        elif os.path.isfile(save_quit_file):
            should_save = should_quit = True
            os.remove(save_quit_file)
        if 'save_every_n_steps' in self.config and step % self.config['save_every_n_steps'] == 0:
            self.save_model(f'step{step}')
            saved = True
        if self.need_to_checkpoint() or should_save:
            self.save_checkpoint(step, examples)
            checkpointed = True
        if should_quit:
            print('Manually quitting', flush=True)
            sys.exit()
        return checkpointed, saved


def main():
    with open(args.config, 'rb') as f:
        config = json.loads(json.dumps(tomllib.load(f)))
    set_config_defaults(config)

    dsio.ds_log('INFO', 'comm.py:658:init_distributed', 'cdb=None')
    dsio.ds_log('INFO', 'comm.py:689:init_distributed', 'Initializing TorchBackend in DeepSpeed with backend nccl')

    resume_from_checkpoint = (
        args.resume_from_checkpoint if args.resume_from_checkpoint is not None
        else config.get('resume_from_checkpoint', False)
    )
    # distributed_init: the script's --master_port wins over MASTER_PORT.
    os.environ['MASTER_PORT'] = str(args.master_port)
    store = init_distributed(args.master_port)  # noqa: F841 (held until exit)
    model_type = load_model(config['model'])

    with open(config['dataset'], 'rb') as f:
        dataset_config = tomllib.load(f)
    examples_per_epoch = load_dataset(dataset_config, model_type)
    micro_batch = config.get('micro_batch_size_per_gpu', 1)
    gas = config.get('gradient_accumulation_steps', 1)
    micro_batches_per_epoch = examples_per_epoch // micro_batch
    if micro_batches_per_epoch == 0:
        dsio.ds_log('WARNING', 'dataset.py:226:_make_divisible_by',
                  "size bucket (1024, 1024, 1) is being completely dropped because it doesn't have enough images")
        raise RuntimeError('stand-in: every size bucket was dropped; there is no batch to train on')
    if args.cache_only:
        sys.exit(0)
    get_optimizer(config['optimizer'])

    if not resume_from_checkpoint:
        run_dir = os.path.join(config['output_dir'], datetime.now(timezone.utc).strftime('%Y%m%d_%H-%M-%S'))
        os.makedirs(run_dir, exist_ok=True)
        shutil.copy(args.config, run_dir)
        shutil.copy(config['dataset'], run_dir)
    if resume_from_checkpoint is True:
        run_dir = get_most_recent_run_dir(config['output_dir'])
    elif isinstance(resume_from_checkpoint, str):
        run_dir = os.path.join(config['output_dir'], resume_from_checkpoint)
        if not os.path.exists(run_dir):
            raise ValueError(f'Checkpoint directory {run_dir} does not exist')
    else:
        run_dir = get_most_recent_run_dir(config['output_dir'])

    global_batch = micro_batch * gas
    print(f'Global batch size = {global_batch}', flush=True)
    loader = Loader(micro_batches_per_epoch)
    trainer = Trainer(config, model_type, run_dir, loader, global_batch)

    step = 1
    examples = global_batch
    if resume_from_checkpoint:
        load_path, saved_state = dsio.load_checkpoint(run_dir)
        assert load_path is not None
        client_state = saved_state['client_state']
        loader.load_state_dict(client_state['custom_loader'])
        trainer.state = saved_state['lora']
        step = client_state['step'] + 1
        examples = client_state['examples'] + global_batch
        print(f'Resuming training from checkpoint. Resuming at epoch: {loader.epoch}, step: {step}', flush=True)

    step_seconds = float(os.environ.get('STANDIN_STEP_SECONDS', '0.02'))
    fault_kind, fault_step = fault()
    epoch = loader.epoch
    checkpointed = saved = False
    while True:
        if step == fault_step:
            if fault_kind == 'oom':
                dsio.print_oom(os.path.abspath(__file__))
                sys.exit(1)
            if fault_kind == 'hang':
                while True:
                    time.sleep(3600)
            if fault_kind == 'exit0':
                sys.exit(0)
            if fault_kind == 'crash':
                raise RuntimeError('The size of tensor a (4096) must match the size of tensor b (4608) at non-singleton dimension 1')
        started = time.time()
        time.sleep(step_seconds)
        loss = trainer.train_batch(step)
        iter_time = max(time.time() - started, 1e-6)
        print(f'steps: {step} loss: {loss:0.4f} iter time (s): {iter_time:0.3f} samples/sec: {global_batch / iter_time:0.3f}', flush=True)

        new_epoch, checkpointed, saved = trainer.process_epoch(epoch, step, examples)
        if new_epoch != epoch:
            if new_epoch is None:
                final_model_name = f'epoch{epoch}'
                break
            epoch = new_epoch

        checkpointed, saved = trainer.process_step(step, examples)
        if 'max_steps' in config and step >= config['max_steps']:
            final_model_name = f'step{step}'
            break
        step += 1
        examples += global_batch

    if not checkpointed:
        trainer.save_checkpoint(step, examples)
    if not saved:
        trainer.save_model(final_model_name)
    print('TRAINING COMPLETE!', flush=True)


if __name__ == '__main__':
    main()
