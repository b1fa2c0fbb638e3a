// Re-Basin extension: client-side hooks. Every global here starts with rebasin_ (all extension JS shares one
// namespace). The tab calls these through guarded inline hooks, so it still works where this file is not loaded.

// Merge / Run recipe / Compare: give the job a WebUI task id (the event's input at taskIndex) and show the host's
// own progress bar above our panel (anchorId: the element it goes in, the merge's by default).
function rebasin_start_merge(taskIndex, args, anchorId) {
    var id = (typeof randomId === 'function') ? randomId() : 'task(rebasin-' + Math.random().toString(36).slice(2, 12) + ')';
    var anchor = gradioApp().getElementById(anchorId || 'rebasin_progress_anchor');
    if (anchor && typeof requestProgress === 'function') {
        requestProgress(id, anchor, null, function() {});
    }
    args[taskIndex] = id;
    return args;
}

// Switch to txt2img by the tab's own id (robust to reordered tabs), else the host's helper.
function rebasin_switch_to_txt2img() {
    var tabs = gradioApp().querySelector('#tabs');
    var content = gradioApp().getElementById('tab_txt2img');
    if (tabs && content) {
        var buttons = tabs.querySelectorAll(':scope > .tab-nav > button, :scope > div > button');
        var items = Array.from(tabs.querySelectorAll(':scope > .tabitem, :scope > div.tabitem'));
        var index = items.indexOf(content);
        if (index >= 0 && buttons[index]) {
            buttons[index].click();
            return;
        }
    }
    if (typeof switch_to_txt2img === 'function') {
        switch_to_txt2img();
    }
}

function rebasin_set_number(elemId, value) {
    var el = gradioApp().querySelector('#' + elemId + ' input[type=number]');
    if (!el) return false;
    el.value = value;
    if (typeof updateInput === 'function') updateInput(el);
    return true;
}

// Fallback when the Python side could not capture the txt2img hires-fix components: set them in the DOM.
// The upscaler dropdown cannot be set reliably this way; it is left as the user has it.
function rebasin_apply_hires(denoise, scale, steps) {
    if (typeof inputAccordionChecked === 'function' && gradioApp().getElementById('txt2img_hr')) {
        inputAccordionChecked('txt2img_hr', true);
    } else {
        var box = gradioApp().querySelector('#txt2img_hr-visible-checkbox, #txt2img_enable_hr input[type=checkbox]');
        if (box && !box.checked) box.click();
    }
    rebasin_set_number('txt2img_denoising_strength', denoise);
    rebasin_set_number('txt2img_hr_scale', scale);
    rebasin_set_number('txt2img_hires_steps', steps);
    rebasin_switch_to_txt2img();
}

onUiLoaded(function() {
    var tab = gradioApp().getElementById('tab_rebasin');
    if (tab) tab.classList.add('rebasin-ready');
});
