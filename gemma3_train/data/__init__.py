"""Input pipelines: sources, the Gemma 3 tokenizer, packing, chat/SFT format, global batches."""

from gemma3_train.data.documents import format_chat
from gemma3_train.data.mixture import tokens_drawn
from gemma3_train.data.pipeline import BATCH_DTYPES
from gemma3_train.data.pipeline import IMAGE_BATCH_DTYPES
from gemma3_train.data.pipeline import global_batch
from gemma3_train.data.pipeline import make_dataset
from gemma3_train.data.pipeline import make_eval_iterator
from gemma3_train.data.pipeline import make_train_iterator
from gemma3_train.data.sources import DataError
from gemma3_train.data.tokenizer import Tokenizer
