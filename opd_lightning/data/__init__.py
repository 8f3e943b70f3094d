from opd_lightning.data.batch import PromptBatch, SFTBatch
from opd_lightning.data.datamodule import PromptDataModule
from opd_lightning.data.tasks import DEFAULT_TASKS, TaskSpec
from opd_lightning.data.teacher_samples import TeacherSampleCache

__all__ = ["DEFAULT_TASKS", "PromptBatch", "PromptDataModule", "SFTBatch", "TaskSpec", "TeacherSampleCache"]
