// Lemonade web UI: the model manager tab (list, pull, delete, load/unload,
// register a Hugging Face model, upload a local model).
(function () {
  'use strict';
  const L = window.Lemonade;
  const { api, el } = L;

  const REGISTER_RECIPES = ['llamacpp', 'oga-cpu', 'oga-hybrid', 'oga-npu', 'flm'];
  const UPLOAD_RECIPES = ['llamacpp', 'oga-npu', 'oga-hybrid', 'oga-cpu'];   // spec §4.14 check 4

  const $ = (id) => document.getElementById(id);
  const state = {
    models: [],           // entries of GET /api/v1/models?show_all=true
    busy: new Map(),      // model name -> "Downloading…" etc.
    fetched: false,
  };

  // ---------------- notices ----------------
  let noticeTimer = null;
  function notify(text, kind) {
    const box = $('models-message');
    box.textContent = text;
    box.className = 'notice' + (kind ? ' ' + kind : '');
    box.setAttribute('role', kind === 'error' ? 'alert' : 'status');
    box.hidden = false;
    clearTimeout(noticeTimer);
    if (kind === 'ok') noticeTimer = setTimeout(() => { box.hidden = true; }, 8000);
  }

  // ---------------- list ----------------
  async function refresh() {
    try {
      const data = await api('/models?show_all=true');
      state.models = (data && data.data) || [];
      state.fetched = true;
      fillRecipeFilter();
      render();
    } catch (e) {
      notify('Could not list models: ' + e.message, 'error');
    }
  }

  function fillRecipeFilter() {
    const sel = $('filter-recipe');
    const current = sel.value;
    const recipes = [...new Set(state.models.map((m) => m.recipe))].sort();
    sel.replaceChildren(el('option', { value: '' }, 'All recipes'),
      ...recipes.map((r) => el('option', { value: r }, r)));
    sel.value = recipes.includes(current) ? current : '';
  }

  function visibleModels() {
    const q = $('model-filter').value.trim().toLowerCase();
    const onlyDownloaded = $('filter-downloaded').checked;
    const recipe = $('filter-recipe').value;
    return state.models.filter((m) =>
      (!q || m.id.toLowerCase().includes(q) || String(m.checkpoint || '').toLowerCase().includes(q)) &&
      (!onlyDownloaded || m.downloaded) &&
      (!recipe || m.recipe === recipe));
  }

  function render() {
    const tbody = $('models-tbody');
    const rows = visibleModels().map(renderRow);
    if (!rows.length) {
      rows.push(el('tr', {}, el('td', { colspan: 5 }, state.fetched ? 'No models match.' : 'Loading…')));
    }
    tbody.replaceChildren(...rows);
    $('unload-btn').disabled = !L.health.modelLoaded;
  }

  function renderRow(m) {
    const loaded = L.health.modelLoaded === m.id;
    const busy = state.busy.get(m.id);
    const labels = L.modelLabels(m.id, m);
    const status = [];
    if (busy) status.push(el('span', { class: 'badge' }, busy));
    else {
      if (loaded) status.push(el('span', { class: 'badge loaded' }, 'Loaded'));
      status.push(m.downloaded
        ? el('span', { class: 'badge downloaded' }, 'Downloaded')
        : el('span', { class: 'badge' }, 'Not downloaded'));
    }
    const actions = [];
    const dis = !!busy;
    if (!m.downloaded) {
      actions.push(button('Download', () => pull(m.id), dis, 'Download ' + m.id));
    } else {
      actions.push(loaded
        ? button('Unload', unload, dis, 'Unload ' + m.id)
        : button('Load', () => load(m.id), dis, 'Load ' + m.id));
      actions.push(button('Delete', () => remove(m.id), dis, 'Delete ' + m.id, 'danger'));
    }
    return el('tr', { dataset: { model: m.id, downloaded: String(!!m.downloaded) } },
      el('td', { class: 'name' }, m.id, el('span', { class: 'checkpoint' }, m.checkpoint || '')),
      el('td', {}, m.recipe || ''),
      el('td', {}, labels.map((l) => el('span', { class: 'badge' }, l))),
      el('td', {}, status),
      el('td', { class: 'actions' }, actions));
  }

  function button(text, onclick, disabled, label, cls) {
    return el('button', { type: 'button', class: 'small ' + (cls || 'secondary'), onclick, disabled, 'aria-label': label }, text);
  }

  // ---------------- actions ----------------
  // Runs one model action, marking its row busy meanwhile.
  async function withBusy(name, label, fn) {
    state.busy.set(name, label);
    render();
    try {
      return await fn();
    } finally {
      state.busy.delete(name);
      render();
    }
  }

  async function pull(name, extra) {
    notify('Downloading ' + name + '… this can take a while.');
    try {
      await withBusy(name, 'Downloading…', () =>
        api('/pull', { method: 'POST', body: { model_name: name, ...(extra || {}) } }));
      notify('Downloaded ' + name + '.', 'ok');
      await afterChange();
      return true;
    } catch (e) {
      notify('Download of ' + name + ' failed: ' + e.message, 'error');
      await afterChange();
      return false;
    }
  }

  async function remove(name) {
    if (!window.confirm('Delete the files of ' + name + '?')) return;
    try {
      await withBusy(name, 'Deleting…', () => api('/delete', { method: 'POST', body: { model_name: name } }));
      notify('Deleted ' + name + '.', 'ok');
    } catch (e) {
      notify('Delete of ' + name + ' failed: ' + e.message, 'error');
    }
    await afterChange();
  }

  async function load(name) {
    L.setBusyStatus('Loading ' + name + '…');
    try {
      await withBusy(name, 'Loading…', () => api('/load', { method: 'POST', body: { model_name: name } }));
      notify('Loaded ' + name + '.', 'ok');
    } catch (e) {
      notify('Load of ' + name + ' failed: ' + e.message, 'error');
    } finally {
      L.setBusyStatus(null);
    }
    await L.refreshHealth();
  }

  async function unload() {
    const name = L.health.modelLoaded;
    L.setBusyStatus('Unloading…');
    try {
      await api('/unload', { method: 'POST' });
      notify(name ? 'Unloaded ' + name + '.' : 'Nothing was loaded.', 'ok');
    } catch (e) {
      notify('Unload failed: ' + e.message, 'error');
    } finally {
      L.setBusyStatus(null);
    }
    await L.refreshHealth();
  }

  async function afterChange() {
    await refresh();
    L.emit('models-changed');
  }

  // ---------------- register (pull with checkpoint) ----------------
  function userName(input) {
    const raw = input.value.trim().replace(/^user\./, '');
    return raw ? 'user.' + raw : '';
  }

  async function onRegister(e) {
    e.preventDefault();
    const name = userName($('reg-name'));
    const checkpoint = $('reg-checkpoint').value.trim();
    const recipe = $('reg-recipe').value;
    if (!name || !checkpoint) { notify('Name and checkpoint are required.', 'error'); return; }
    const body = {
      checkpoint, recipe,
      reasoning: $('reg-reasoning').checked,
      vision: $('reg-vision').checked,
    };
    const mmproj = $('reg-mmproj').value.trim();
    if (mmproj) body.mmproj = mmproj;
    const submit = $('reg-submit');
    submit.disabled = true;
    if (!state.models.some((m) => m.id === name)) {
      state.models.push({ id: name, checkpoint, recipe, downloaded: false, labels: [] });
    }
    try {
      if (await pull(name, body)) $('register-form').reset();
    } finally {
      submit.disabled = false;
    }
  }

  // ---------------- upload a local model (multipart) ----------------
  async function onUpload(e) {
    e.preventDefault();
    const name = userName($('up-name'));
    const recipe = $('up-recipe').value;
    const files = [...$('up-files').files, ...$('up-single').files];
    if (!name) { notify('A name is required.', 'error'); return; }
    if (!files.length) { notify('Choose a model folder or files to upload.', 'error'); return; }
    const variant = $('up-variant').value.trim();
    const form = new FormData();
    form.append('model_name', name);
    form.append('checkpoint', variant ? name + ':' + variant : '');
    form.append('recipe', recipe);
    form.append('mmproj', $('up-mmproj').value.trim());
    form.append('reasoning', String($('up-reasoning').checked));
    form.append('vision', String($('up-vision').checked));
    // Folder picks carry "folder/file" in webkitRelativePath; the server
    // strips the first path component.
    for (const f of files) form.append('model_files', f, f.webkitRelativePath || f.name);
    const submit = $('up-submit');
    submit.disabled = true;
    notify('Uploading ' + files.length + ' file(s) for ' + name + '…');
    try {
      const res = await api('/add-local-model', { method: 'POST', body: form });
      notify((res && res.message) || 'Uploaded ' + name + '.', 'ok');
      $('upload-form').reset();
      await afterChange();
    } catch (err) {
      notify('Upload failed: ' + err.message, 'error');
    } finally {
      submit.disabled = false;
    }
  }

  // ---------------- wiring ----------------
  function fillSelect(id, values) {
    $(id).replaceChildren(...values.map((v) => el('option', { value: v }, v)));
  }

  function init() {
    fillSelect('reg-recipe', REGISTER_RECIPES);
    fillSelect('up-recipe', UPLOAD_RECIPES);
    $('model-filter').addEventListener('input', render);
    $('filter-downloaded').addEventListener('change', render);
    $('filter-recipe').addEventListener('change', render);
    $('refresh-models-btn').addEventListener('click', refresh);
    $('unload-btn').addEventListener('click', unload);
    $('register-form').addEventListener('submit', onRegister);
    $('upload-form').addEventListener('submit', onUpload);
  }

  // shared.js announces the initial tab on DOMContentLoaded, so this also
  // covers opening the page directly at #model-management.
  L.on('tab', (tab) => { if (tab === 'model-management') refresh(); });
  // Re-render only when the loaded model changes, so keyboard focus inside
  // the table survives the periodic health poll.
  let lastLoaded;
  L.on('health', (h) => {
    if (h.modelLoaded === lastLoaded) return;
    lastLoaded = h.modelLoaded;
    if (state.fetched) render();
  });
  document.addEventListener('DOMContentLoaded', init);
})();
