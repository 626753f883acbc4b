//! The records' sizes (no implicit padding), slot words and reason names.

use core::mem::size_of;

use super::*;

#[test]
fn pod_sizes_have_no_implicit_padding() {
    assert_eq!(size_of::<PortKey>(), 16);
    assert_eq!(size_of::<Policy>(), 56);
    assert_eq!(size_of::<AddrKey>(), 32);
    assert_eq!(size_of::<AllowKey>(), 20);
    assert_eq!(size_of::<CounterKey>(), 24);
    assert_eq!(size_of::<Counters>(), 8 * (4 + reason::DROP_COUNT));
    assert_eq!(size_of::<ConnSlots>(), 24);
    assert_eq!(size_of::<FlowKey>(), 40);
    assert_eq!(size_of::<SocketState>(), 40);
    assert_eq!(size_of::<DenyEvent>(), 56);
    assert_eq!(size_of::<EventRate>(), 16);
    assert_eq!(size_of::<GateConfig>(), 32);
    assert_eq!(size_of::<HandoffKey>(), 40);
    assert_eq!(size_of::<PendingSyn>(), 16);
}

#[test]
fn slot_words_keep_epoch_and_count_apart() {
    let word = slot_word::pack(7, 3);
    assert_eq!(slot_word::epoch(word), 7);
    assert_eq!(slot_word::count(word), 3);
    assert_eq!(slot_word::count_for(word, 7), 3);
    assert_eq!(slot_word::count_for(word, 8), 0);
    assert_eq!(slot_word::pack(u32::MAX, u32::MAX), u64::MAX);
}

#[test]
fn reason_names_are_stable() {
    assert_eq!(reason::name(reason::UNALLOCATED), "unallocated");
    assert_eq!(reason::name(reason::CONN_LIMIT), "conn_limit");
    assert_eq!(reason::drop_index(reason::UNALLOCATED), 0);
    assert_eq!(reason::drop_index(reason::CONN_LIMIT), 4);
}
