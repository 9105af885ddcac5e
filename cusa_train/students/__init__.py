"""Students: the models CUSA trains.

- :mod:`cusa_train.students.registry`: :func:`build_student`, :func:`list_students`, the built-in
  offline student;
- :mod:`cusa_train.students.clip` (the model), :mod:`~cusa_train.students.clip_weights` (releases,
  checked downloads, state dicts), :mod:`~cusa_train.students.clip_tokenizer` (BPE) and
  :mod:`~cusa_train.students.clip_catalog` (names): OpenAI CLIP, natively in torch;
- :mod:`cusa_train.students.adapters`: open_clip and Hugging Face CLIP behind the student interface.
"""
